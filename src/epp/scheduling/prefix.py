"""Approximate prefix-cache index: which endpoint probably holds which prompt blocks.

The prompt is cut into blocks of ``block_tokens x CHARS_PER_TOKEN`` characters; block hashes are
chained (xxh64 of the block text and the previous hash, seeded by the target model),
so a hash names a whole prefix.  Each endpoint keeps an LRU of the hashes epp sent
it, sized from the server's ``cache_config_info`` (``num_gpu_blocks``) when known.
An endpoint's match is the number of *leading* blocks it holds, over the number of
blocks in the prompt.  Hashes are private to epp, so they only need to be
self-consistent, not identical to vLLM's.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Sequence

import xxhash

from epp.domain import CHARS_PER_TOKEN

DEFAULT_BLOCK_TOKENS = 16
DEFAULT_CAPACITY = 31_250  # blocks per server when cache_config_info is unknown (reference default)
_PACK = struct.Struct("<Q").pack


def block_hashes(
    text: str, model: str, *, block_tokens: int = DEFAULT_BLOCK_TOKENS, max_blocks: int = 256
) -> list[int]:
    """Chained hashes of the full leading blocks of ``text`` (a trailing partial block is ignored)."""
    size = block_tokens * CHARS_PER_TOKEN
    n = min(len(text) // size, max_blocks)
    if n == 0:
        return []
    data = text.encode("utf-8", "surrogatepass") if not text.isascii() else text.encode()
    if len(data) != len(text):  # multi-byte text: cut on characters, hash the utf-8 bytes
        chunks = [text[i * size : (i + 1) * size].encode("utf-8", "surrogatepass") for i in range(n)]
    else:
        chunks = [data[i * size : (i + 1) * size] for i in range(n)]
    h = xxhash.xxh64_intdigest(model.encode())
    out = []
    for chunk in chunks:
        h = xxhash.xxh64_intdigest(chunk + _PACK(h))
        out.append(h)
    return out


class _Lru:
    __slots__ = ("capacity", "items")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[int, None] = OrderedDict()


class PrefixIndex:
    """hash → endpoints holding it, with per-endpoint LRU eviction."""

    def __init__(self, *, default_capacity: int = DEFAULT_CAPACITY) -> None:
        self._default_capacity = default_capacity
        self._lru: dict[str, _Lru] = {}
        self._holders: dict[int, set[str]] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def match(self, hashes: Sequence[int], addresses: Sequence[str]) -> list[float]:
        """Fraction of leading blocks each address holds (0.0 when the prompt has no full block)."""
        total = len(hashes)
        if total == 0 or not self._holders:
            return [0.0] * len(addresses)
        counts: dict[str, int] = {}
        holders = self._holders
        for depth, h in enumerate(hashes, 1):
            found = holders.get(h)
            if not found:
                break
            extended = False
            for a in found:
                if counts.get(a, 0) == depth - 1:  # still on a contiguous run from the first block
                    counts[a] = depth
                    extended = True
            if not extended:
                break
        if not counts:
            return [0.0] * len(addresses)
        return [counts.get(a, 0) / total for a in addresses]

    def holders(self, h: int) -> set[str]:
        return self._holders.get(h, set())

    def record(self, address: str, hashes: Sequence[int], capacity: int | None = None) -> None:
        """The request was sent to ``address``: it will hold these blocks."""
        lru = self._lru.get(address)
        if lru is None:
            lru = self._lru[address] = _Lru(capacity or self._default_capacity)
        elif capacity and capacity != lru.capacity:
            lru.capacity = capacity
        items = lru.items
        for h in hashes:
            if h in items:
                items.move_to_end(h)
            else:
                items[h] = None
                self._holders.setdefault(h, set()).add(address)
        while len(items) > lru.capacity:
            old, _ = items.popitem(last=False)
            holders = self._holders.get(old)
            if holders is not None:
                holders.discard(address)
                if not holders:
                    del self._holders[old]

    def forget(self, keep: set[str]) -> None:
        """Drop endpoints that left the pool."""
        for address in [a for a in self._lru if a not in keep]:
            for h in self._lru.pop(address).items:
                holders = self._holders.get(h)
                if holders is not None:
                    holders.discard(address)
                    if not holders:
                        del self._holders[h]
