"""The block-key scheme (``epp/scheduling/blockkeys.py``): the same keys from a prompt and from token ids."""

from __future__ import annotations

import struct

import pytest
import xxhash

from epp.scheduling.blockkeys import BlockKeys, Utf8QuadTokenizer

TEXT = "You are a helpful assistant. Answer briefly and precisely, please!!" * 3  # 201 ASCII chars


def test_prompt_keys_equal_keys_chained_over_its_token_ids() -> None:
    keys = BlockKeys()
    ids = Utf8QuadTokenizer().token_ids(TEXT)
    assert len(ids) == 51  # 201 bytes: 50 full tokens and a padded one
    for bs in (4, 16):
        from_prompt = keys.prompt_keys(TEXT, "m", bs)
        assert len(from_prompt) == 200 // (4 * bs)  # full blocks only
        assert from_prompt == keys.chain(keys.root("m"), ids, bs)[: len(from_prompt)]


def test_the_scheme_exactly() -> None:
    keys = BlockKeys(hash_seed="42")
    root = xxhash.xxh3_64_intdigest(b"42\0m")
    first = xxhash.xxh3_64_intdigest(struct.pack("<4I", 1, 2, 3, 4), seed=root)
    assert keys.root("m") == root
    second = xxhash.xxh3_64_intdigest(struct.pack("<4I", 5, 6, 7, 8), seed=first)
    assert keys.chain(root, [1, 2, 3, 4, 5, 6, 7, 8], 4) == [first, second]
    assert keys.chain(root, [1, 2, 3], 4) == []  # no full block


@pytest.mark.parametrize(
    "other, shared",
    [(TEXT[:128] + "x" * 73, 2), ("y" + TEXT[1:], 0), (TEXT, 3)],
    ids=["same-head", "different-first-block", "same"],
)
def test_prompts_share_exactly_their_common_leading_blocks(other, shared) -> None:
    keys = BlockKeys()
    a, b = keys.prompt_keys(TEXT, "m", 16), keys.prompt_keys(other, "m", 16)
    common = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    assert common == shared


def test_model_seed_and_cap() -> None:
    keys = BlockKeys(max_blocks=2)
    assert len(keys.prompt_keys(TEXT, "m", 4)) == 2
    assert keys.prompt_keys(TEXT, "m", 4) != keys.prompt_keys(TEXT, "sql-lora", 4)
    assert BlockKeys(hash_seed="1").root("m") != BlockKeys(hash_seed="2").root("m")


def test_a_pluggable_tokenizer_gives_keys_matching_its_token_ids() -> None:
    class Words:
        name = "words"

        def token_ids(self, text: str) -> list[int]:
            return [len(w) for w in text.split()]

    keys = BlockKeys(Words())
    text = "a bb ccc dddd e ff ggg hhhh i"
    assert keys.prompt_keys(text, "m", 4) == keys.chain(keys.root("m"), [1, 2, 3, 4, 1, 2, 3, 4, 1], 4)


def test_non_ascii_text_is_cut_on_utf8_bytes() -> None:
    keys = BlockKeys()
    text = "é" * 40  # 80 bytes
    ids = Utf8QuadTokenizer().token_ids(text)
    assert keys.prompt_keys(text, "m", 4) == keys.chain(keys.root("m"), ids, 4)
    assert len(keys.prompt_keys(text, "m", 4)) == 5
