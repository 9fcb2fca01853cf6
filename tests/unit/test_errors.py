from __future__ import annotations

from epp.errors import MAX_MESSAGE, BadRequest, clip


def test_clip_keeps_short_values_and_says_how_much_it_cut():
    assert clip("gpt") == "'gpt'"
    cut = clip("y" * 10_000, 20)
    assert cut.startswith("'yyyy") and cut.endswith("…(+9982 chars)") and len(cut) < 40


def test_a_rejection_message_is_bounded():
    e = BadRequest("z" * 1_000_000)
    assert len(e.message) <= MAX_MESSAGE + 30 and e.message.endswith("chars)")
    assert BadRequest("short").message == "short"
