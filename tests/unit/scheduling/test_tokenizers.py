"""Reproduced model-server tokenizers (``epp/scheduling/tokenizers.py``).

The expected pieces and ids were printed by a Go program running llm-d-inference-sim
v0.10.2's own expression and ``hash/fnv.New32a`` (``pkg/tokenizer/tokenizer.go``); the
integration test ``tests/integration/test_llmd_kvevents.py`` checks the same against the
simulator's KV events and usage counts.
"""

from __future__ import annotations

import pytest

from epp.scheduling.blockkeys import BlockKeys, Tokenizer
from epp.scheduling.tokenizers import LlmdSimTokenizer, fnv1a_32


@pytest.mark.parametrize(
    "text, pieces, ids",
    [
        ("hello_world  foo", ["hello_world  ", "foo"], [1984716840, 2851307223]),
        ("### user: hi there\n", ["#", "#", "# ", "user", ": ", "hi ", "there\n"],
         [638357778, 638357778, 399020470, 1618501362, 2382766391, 3469895374, 1916852213]),
        ("_x a__b (c)-d\ve", ["_", "x ", "a__b ", "(", "c", ")", "-", "d", "e"],  # \v is not Go's \s
         [3658226030, 23262949, 2973192544, 755801111, 3859557458, 739023492, 671913016, 3775669363, 3758891744]),
        ("café naïve", ["caf", "na", "ve"], [4168369661, 1412848112, 1212796612]),  # non-ASCII skipped
        ("a", ["a"], [3826002220]),
        ("  ", [], []),
    ],
    ids=["word-underscore", "chat-header", "punctuation", "non-ascii", "one", "blank"],
)  # fmt: skip
def test_llmd_sim_tokenizer_matches_the_simulator(text: str, pieces: list[str], ids: list[int]) -> None:
    t = LlmdSimTokenizer()
    assert t.pieces(text) == pieces
    assert list(t.token_ids(text)) == ids
    assert list(t.token_ids(text)) == ids  # memoised pieces give the same ids


def test_fnv1a_32_reference_vectors() -> None:
    assert (fnv1a_32(b""), fnv1a_32(b"a"), fnv1a_32(b"foobar")) == (0x811C9DC5, 0xE40C292C, 0xBF9CF968)


def test_block_keys_with_the_tokenizer() -> None:
    tokenizer: Tokenizer = LlmdSimTokenizer()
    keys = BlockKeys(tokenizer)
    text = " ".join(f"w{i}" for i in range(40))  # 40 tokens: two full blocks of 16
    ids = tokenizer.token_ids(text)
    assert keys.prompt_keys(text, "m", 16) == keys.chain(keys.root("m"), ids, 16)
    assert len(keys.prompt_keys(text, "m", 16)) == 2


def test_utf8_quad_chat_text_is_epp_sims_chat_template() -> None:
    """epp-sim renders a chat with its own template before tokenizing; the default tokenizer's
    chat_text must give the same text, or chat prompts never match the pod's KV events."""
    from epp.scheduling.blockkeys import BlockKeys, Utf8QuadTokenizer
    from epp_sim.openai_api import render_chat

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "héllo"}]
    pairs = [(m["role"], m["content"]) for m in messages]
    assert Utf8QuadTokenizer().chat_text(pairs) == render_chat(messages)
    keys = BlockKeys()
    assert keys.request_text("system:You are terse.\n", pairs) == render_chat(messages)
    assert keys.request_text("plain prompt") == "plain prompt"  # not a chat: the prompt as parsed


def test_llmd_sim_tokenizer_stops_at_the_limit() -> None:
    """Only a prompt's first max_blocks blocks are keyed, so the rest is never tokenized."""
    from epp.scheduling.blockkeys import BlockKeys
    from epp.scheduling.tokenizers import LlmdSimTokenizer

    tok = LlmdSimTokenizer()
    text = "word " * 10_000
    assert list(tok.token_ids(text, limit=32)) == list(tok.token_ids(text))[:32]
    keys = BlockKeys(tok, max_blocks=4)
    assert keys.prompt_keys(text, "m", 16) == BlockKeys(tok, max_blocks=1000).prompt_keys(text, "m", 16)[:4]
