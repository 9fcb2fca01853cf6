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

Events (vLLM KV-cache events, `kvevents.py`): with an `EventLog` in `events`, every block
`commit` registers is reported as `BlockStored` (one event per contiguous run, naming the
parent of its first block and carrying the blocks' token ids), every cached block `_take`
evicts as `BlockRemoved`, and `clear()` as `AllBlocksCleared`.  So the log is exactly the
history of the prefix table: replaying it gives the set of cached hashes.

Invariants: `0 <= used <= usable`; every hash in `_lru` has reference count 0 and every
hash with count 0 is in `_lru`; a request's blocks = `len(table.held) + table.private`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from epp_sim.kvevents import EventLog
from epp_sim.tokenizer import Prompt, block_token_ids

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
        self.events: EventLog | None = None

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

    def commit(
        self,
        table: BlockTable,
        hashes: Sequence[int],
        num_computed: int,
        prompt: Prompt | None = None,
        lora: str | None = None,
    ) -> None:
        """Publish the request's fully computed prompt blocks as reusable prefixes.

        `prompt` and `lora` only feed the events (token ids, `lora_name`)."""
        full = min(len(hashes), num_computed // self.block_size)
        ref = self._ref
        log = self.events
        run_start = table.registered
        while table.registered < full:
            k = table.registered
            h = hashes[k]
            table.registered += 1
            if h in ref:
                # another request cached it first: ours stays a private duplicate
                if log is not None:
                    self._stored(log, hashes, run_start, k, prompt=prompt, lora=lora)
                    run_start = k + 1
                continue
            ref[h] = 1
            table.held.append(h)
            table.private -= 1
        if log is not None:
            self._stored(log, hashes, run_start, table.registered, prompt=prompt, lora=lora)

    def _stored(
        self, log: EventLog, hashes: Sequence[int], start: int, stop: int, *, prompt: Prompt | None, lora: str | None
    ) -> None:
        if stop <= start:
            return
        bs = self.block_size
        tokens: list[int] = []
        if prompt is not None:
            for k in range(start, stop):
                tokens.extend(block_token_ids(prompt, k, bs))
        log.stored(hashes[start:stop], hashes[start - 1] if start > 0 else None, tokens, bs, lora)

    def clear(self, *, publish: bool = True) -> bool:
        """Drop every cached block (vLLM's prefix-cache reset); False, and nothing done, while a
        request still references one.  `publish=False`: a process restart, which sends no event."""
        if len(self._lru) != len(self._ref):
            return False
        self._ref.clear()
        self._lru.clear()
        if publish and self.events is not None:
            self.events.cleared()
        return True

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
        evict = n - spare
        if evict > 0:
            gone = []
            for _ in range(evict):
                h, _ = self._lru.popitem(last=False)
                del self._ref[h]
                gone.append(h)
            if self.events is not None:
                self.events.removed(gone)
        self.used += n
