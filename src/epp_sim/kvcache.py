"""A pod's paged KV cache with automatic prefix caching.

Owns block accounting: which blocks are referenced by requests, which hold reusable prompt
prefixes, and LRU eviction of unreferenced cached blocks.

Model (after vLLM's V1 `BlockPool`, simplified to counts and hashes):

- `num_gpu_blocks - 1` blocks are usable (vLLM reserves one null block).
- A *cached* block is identified by its prompt-prefix hash and has a reference count. Cached
  blocks whose count drops to 0 stay reusable but evictable, in LRU order.
- A *private* block belongs to one request and holds no reusable prefix (decode tokens, the
  partial last prompt block, or a duplicate of an already-cached block).
- Free blocks = usable - referenced; evictable cached blocks count as free, so usage can be
  low while the cache still holds valuable prefixes (as in vLLM's `kv_cache_usage_perc`).

Invariants: `0 <= used <= usable`; every hash in `_lru` has reference count 0 and every
hash with count 0 is in `_lru`; a request's blocks = `len(table.held) + table.private`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["BlockTable", "KVCache"]


@dataclass(slots=True)
class BlockTable:
    """The blocks one request holds."""

    held: list[int] = field(default_factory=list)
    private: int = 0
    registered: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.held) + self.private


class KVCache:
    """Block pool plus prefix-cache index for one pod."""

    def __init__(self, num_gpu_blocks: int, block_size: int) -> None:
        if num_gpu_blocks < 2:
            raise ValueError("num_gpu_blocks must be at least 2")
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.usable = num_gpu_blocks - 1
        self.used = 0
        self._ref: dict[int, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by requests (0..1)."""
        return self.used / self.usable

    @property
    def num_cached(self) -> int:
        """Blocks currently holding a reusable prompt prefix."""
        return len(self._ref)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def match(self, hashes: Sequence[int], max_blocks: int) -> int:
        """Length of the cached prefix of `hashes`, in blocks, at most `max_blocks`."""
        n = 0
        ref = self._ref
        for h in hashes[:max_blocks]:
            if h not in ref:
                break
            n += 1
        return n

    def admit(self, table: BlockTable, hit_hashes: Sequence[int], num_tokens: int) -> bool:
        """Reference the hit blocks and allocate the rest for `num_tokens`; False if full."""
        ref = self._ref
        revive = sum(1 for h in hit_hashes if ref[h] == 0)
        need = self.blocks_for(num_tokens) - len(hit_hashes)
        if revive + max(0, need) > self.usable - self.used:
            return False
        for h in hit_hashes:
            count = ref[h]
            if count == 0:
                del self._lru[h]
                self.used += 1
            ref[h] = count + 1
        table.held = list(hit_hashes)
        table.registered = len(hit_hashes)
        table.private = 0
        if need > 0:
            self._take(need)
            table.private = need
        return True

    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Allocate blocks so that `table` can hold `num_tokens`; False if full."""
        need = self.blocks_for(num_tokens) - table.num_blocks
        if need <= 0:
            return True
        if need > self.usable - self.used:
            return False
        self._take(need)
        table.private += need
        return True

    def commit(self, table: BlockTable, hashes: Sequence[int], num_computed: int) -> None:
        """Publish the request's fully computed prompt blocks as reusable prefixes."""
        full = min(len(hashes), num_computed // self.block_size)
        ref = self._ref
        while table.registered < full:
            h = hashes[table.registered]
            table.registered += 1
            if h in ref:
                continue  # another request cached it first: ours stays a private duplicate
            ref[h] = 1
            table.held.append(h)
            table.private -= 1

    def free(self, table: BlockTable) -> None:
        """Release every block of `table`; its cached blocks stay reusable."""
        ref = self._ref
        # Tail blocks first, so that they are evicted before the shared head of a prefix.
        for h in reversed(table.held):
            count = ref[h] - 1
            ref[h] = count
            if count == 0:
                self._lru[h] = None
                self.used -= 1
        self.used -= table.private
        table.held = []
        table.private = 0
        table.registered = 0

    def _take(self, n: int) -> None:
        spare = self.usable - self.used - len(self._lru)
        for _ in range(n - spare):
            h, _ = self._lru.popitem(last=False)
            del self._ref[h]
        self.used += n
