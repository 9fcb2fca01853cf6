"""The simulator's tokenizer (``epp_sim/tokenizer.py``): deterministic, prefix-sharing block hashes."""

from __future__ import annotations

import pytest

from epp_sim.tokenizer import generated_text, tokenize, tokenize_ids

from support.sim import text_of


def test_tokenizer_is_deterministic_and_prefix_sharing() -> None:
    a = tokenize(text_of(100) + "tail one", 16)
    b = tokenize(text_of(100) + "another tail", 16)
    assert a == tokenize(text_of(100) + "tail one", 16)
    assert a.num_tokens == 102 and len(a.block_hashes) == 6
    assert a.block_hashes[:6] == b.block_hashes[:6]
    assert tokenize(text_of(100), 16, adapter="sql-lora").block_hashes[0] != a.block_hashes[0]
    assert tokenize(text_of(100), 16, cache_salt="s").block_hashes[0] != a.block_hashes[0]


@pytest.mark.parametrize(
    ("text", "tokens", "blocks"),
    [("", 1, 0), ("abc", 1, 0), ("abcd", 1, 0), ("abcde", 2, 0), ("x" * 64, 16, 1), ("x" * 130, 33, 2)],
    ids=["empty", "3-bytes", "4-bytes", "5-bytes", "one-block", "two-blocks-and-a-bit"],
)
def test_token_counts(text: str, tokens: int, blocks: int) -> None:
    p = tokenize(text, 16)
    assert (p.num_tokens, len(p.block_hashes)) == (tokens, blocks)


def test_token_ids_and_generated_text() -> None:
    p = tokenize_ids(list(range(40)), 16)
    assert (p.num_tokens, len(p.block_hashes)) == (40, 2)
    assert generated_text(3, 0, 5) == generated_text(3, 0, 2) + generated_text(3, 2, 5)
