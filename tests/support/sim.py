"""Helpers for the simulator's tests (tests/sim/)."""

from __future__ import annotations

from epp_sim.tokenizer import count_tokens


def text_of(tokens: int, tag: str = "") -> str:
    """Prompt text of exactly `tokens` tokens (4 bytes each), distinct per tag."""
    body = (tag + "abcdefghijklmnopqrstuvwxyz0123456789" * (tokens // 8 + 2))[: tokens * 4]
    assert count_tokens(body) == tokens
    return body
