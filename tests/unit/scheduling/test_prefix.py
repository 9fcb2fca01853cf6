"""The prefix index (``epp/scheduling/prefix.py``): block hashes and who holds them."""

from __future__ import annotations

from epp.scheduling.prefix import PrefixIndex, block_hashes

from support.scheduling import EPS


def test_block_hashes_chain_and_depend_on_model():
    text = "a" * 64 * 3 + "tail"
    h = block_hashes(text, "m")
    assert len(h) == 3  # the partial tail block is not hashed
    assert block_hashes("a" * 64 * 2, "m") == h[:2]  # a hash names the whole prefix
    assert block_hashes(text, "other") != h
    assert block_hashes("b" + text[1:], "m")[2] != h[2]
    assert block_hashes("short", "m") == []


def test_prefix_index_matches_leading_blocks_and_evicts():
    idx = PrefixIndex()
    a, b = EPS[0].address, EPS[1].address
    h = block_hashes("x" * 64 * 4, "m")
    idx.record(a, h)
    idx.record(b, h[:2])
    assert idx.match(h, [a, b, EPS[2].address]) == [1.0, 0.5, 0.0]
    other = block_hashes("y" * 64 * 4, "m")
    idx.record(a, other, capacity=4)  # a's LRU holds 4 blocks: the first prompt's blocks go
    assert idx.match(h, [a, b]) == [0.0, 0.5]
    idx.forget({a})
    assert idx.match(h, [a, b]) == [0.0, 0.0] and idx.match(other, [a]) == [1.0]
