"""The simulator's KV cache (``epp_sim/kvcache.py``): reuse, eviction and usage."""

from __future__ import annotations

from epp_sim.kvcache import BlockTable, KVCache


def test_kv_cache_reuse_eviction_and_usage() -> None:
    kv = KVCache(num_gpu_blocks=5, block_size=16)  # 4 usable
    hashes = [11, 12, 13]
    t1 = BlockTable()
    assert kv.admit(t1, [], 48)
    kv.commit(t1, hashes, 48)
    assert kv.used == 3 and kv.num_cached == 3
    kv.free(t1)
    assert kv.usage == 0.0 and kv.num_cached == 3  # cached blocks are free but reusable
    assert kv.match(hashes, 3) == 3
    t2 = BlockTable()
    assert kv.admit(t2, [11, 12], 40)  # reuse two, allocate one
    assert kv.used == 3 and t2.num_blocks == 3
    t3 = BlockTable()
    assert not kv.admit(t3, [], 32)  # needs 2, only 1 free
    assert kv.admit(t3, [], 16)  # takes the free block, evicting cached 13
    assert kv.match(hashes, 3) == 2
    kv.free(t2)
    kv.free(t3)
    assert kv.used == 0
