"""The KV-event decoder and index (``epp/datalayer/kvevents.py``), on hand-built vLLM messages."""

from __future__ import annotations

import struct

import msgpack
import pytest

from epp.datalayer.kvevents import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventIndex,
    decode_batch,
    port_endpoint,
    topic_prefix,
)
from epp.domain import Endpoint
from epp.scheduling.blockkeys import BlockKeys

BS = 4  # block size of these tests
POD = "10.0.0.1:8000"
TOPIC = b"kv@10.0.0.1:8000@m"


def stored_map(hashes, parent, tokens, lora=None, medium="GPU"):
    """A BlockStored as vLLM >= PR #42892 encodes it (msgspec tagged struct, map form)."""
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": BS, "lora_id": None, "medium": medium, "lora_name": lora}  # fmt: skip


def stored_array(hashes, parent, tokens, lora=None, medium="GPU"):
    """The same event in the older positional form (tag first)."""
    return ["BlockStored", hashes, parent, tokens, BS, None, medium, lora]


def msg(seq, *events, topic=TOPIC, ts=1.5, rank=0):
    return [topic, struct.pack(">Q", seq), msgpack.packb([ts, list(events), rank])]


def index(**kw) -> KVEventIndex:
    return KVEventIndex(BlockKeys(), **kw)


TOKENS = list(range(100, 112))  # three blocks of four tokens


def keys_of(tokens, model="m"):
    k = BlockKeys()
    return k.chain(k.root(model), tokens, BS)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (stored_map([1, 2], None, TOKENS[:8]), BlockStored((1, 2), None, TOKENS[:8], BS, None, "GPU", None)),
        (stored_array([1, 2], 7, TOKENS[:8], "sql-lora"),
         BlockStored((1, 2), 7, TOKENS[:8], BS, None, "GPU", "sql-lora")),
        (["BlockStored", [1], None, TOKENS[:4], BS, None], BlockStored((1,), None, TOKENS[:4], BS)),  # fields omitted
        ({"type": "BlockRemoved", "block_hashes": [3], "medium": "GPU"}, BlockRemoved((3,), "GPU")),
        (["BlockRemoved", [3, 4], "CPU"], BlockRemoved((3, 4), "CPU")),
        ({"type": "AllBlocksCleared"}, AllBlocksCleared()),
        (["AllBlocksCleared"], AllBlocksCleared()),
        (stored_map([-1], b"\x00" * 24 + b"\x01\x02\x03\x04\x05\x06\x07\x08", TOKENS[:4]),
         BlockStored((2**64 - 1,), 0x0102030405060708, TOKENS[:4], BS, None, "GPU", None)),  # int64, bytes
    ],
    ids=["map-stored", "array-stored-lora", "array-short", "map-removed", "array-removed", "map-cleared",
         "array-cleared", "signed-and-bytes-hashes"],
)  # fmt: skip
def test_decode_both_forms(raw, expected) -> None:
    batch = decode_batch(msgpack.packb([1.5, [raw], 0]))
    assert batch.events == [expected]
    assert (batch.ts, batch.data_parallel_rank, batch.unknown) == (1.5, 0, 0)


def test_decode_skips_unknown_types_and_rejects_garbage() -> None:
    batch = decode_batch(msgpack.packb([2.0, [{"type": "BlockPinned"}, ["AllBlocksCleared"]]]))  # no rank
    assert batch.events == [AllBlocksCleared()] and batch.unknown == 1 and batch.data_parallel_rank is None
    for bad in (b"\xc1", msgpack.packb({"ts": 1}), msgpack.packb([1.0, [7]]), msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": ["x"]}]])):  # noqa: E501
        with pytest.raises(ValueError):
            decode_batch(bad)


@pytest.mark.parametrize("form", [stored_map, stored_array], ids=["map", "array"])
def test_stored_blocks_are_keyed_like_the_prompt(form) -> None:
    idx = index()
    idx.apply(POD, msg(0, form([11, 12], None, TOKENS[:8])))
    idx.apply(POD, msg(1, form([13], 12, TOKENS[8:12])))  # extends the chain through its parent
    assert idx.block_size(POD) == BS and idx.num_blocks(POD) == 3
    assert idx.leading_run(POD, keys_of(TOKENS)) == 3
    assert idx.leading_run(POD, keys_of(TOKENS, model="other")) == 0  # the root names the model
    assert idx.leading_run(POD, keys_of([9, 9, 9, 9, *TOKENS[4:]])) == 0  # chained: a different head


def test_lora_blocks_are_keyed_by_adapter() -> None:
    idx = index()
    idx.apply(POD, msg(0, stored_map([21], None, TOKENS[:4], lora="sql-lora")))
    assert idx.leading_run(POD, keys_of(TOKENS[:4], "sql-lora")) == 1
    assert idx.leading_run(POD, keys_of(TOKENS[:4], "m")) == 0


def test_removal_and_all_blocks_cleared() -> None:
    idx = index()
    idx.apply(POD, msg(0, stored_map([11, 12, 13], None, TOKENS)))
    idx.apply(POD, msg(1, {"type": "BlockRemoved", "block_hashes": [12, 99], "medium": "GPU"}))
    assert idx.leading_run(POD, keys_of(TOKENS)) == 1  # the run stops at the evicted block
    assert idx.num_blocks(POD) == 2 and idx.stats.blocks_removed == 1
    idx.apply(POD, msg(2, {"type": "AllBlocksCleared"}))
    assert idx.num_blocks(POD) == 0 and idx.stats.cleared == 1
    assert idx.block_size(POD) == BS  # still publishing: scored as holding nothing, not as unknown


@pytest.mark.parametrize("next_seq, reason", [(5, "gap"), (0, "restart")], ids=["gap", "restart"])
def test_sequence_gap_drops_the_pod_and_rebuilds(next_seq, reason) -> None:
    idx = index()
    other = "10.0.0.2:8000"
    idx.apply(POD, msg(0, stored_map([11, 12], None, TOKENS[:8])))
    idx.apply(POD, msg(1, stored_map([13], 12, TOKENS[8:])))
    idx.apply(other, msg(0, stored_map([11], None, TOKENS[:4])))
    # messages were lost (or the pod restarted): what it holds now is unknown
    idx.apply(POD, msg(next_seq, stored_map([31], None, [7, 7, 7, 7]), stored_map([14], 13, [1, 2, 3, 4])))
    assert idx.stats.gaps == 1 and idx.stats.by_reason == {reason: 1}
    assert idx.leading_run(POD, keys_of(TOKENS)) == 0
    assert idx.leading_run(POD, keys_of([7, 7, 7, 7])) == 1  # rebuilt from the new events
    assert idx.stats.orphans == 1  # block 14's parent was dropped with the rest: it cannot be keyed
    assert idx.leading_run(other, keys_of(TOKENS)) == 1  # other pods are untouched
    idx.apply(POD, msg(next_seq + 1, stored_map([32], 31, [8, 8, 8, 8])))
    assert idx.stats.gaps == 1 and idx.leading_run(POD, keys_of([7, 7, 7, 7, 8, 8, 8, 8])) == 2


def test_malformed_payload_resets_the_pod() -> None:
    idx = index()
    idx.apply(POD, msg(0, stored_map([11], None, TOKENS[:4])))
    idx.apply(POD, [TOPIC, struct.pack(">Q", 1), b"\xc1"])
    assert idx.num_blocks(POD) == 0 and idx.stats.decode_errors == 1 and idx.last_seq(POD) == 1
    idx.apply(POD, [TOPIC, b"\x00"])  # wrong frame count
    assert idx.stats.decode_errors == 2


def test_pod_removal_forgets_it() -> None:
    idx = index()
    for i, pod in enumerate(("10.0.0.1:8000", "10.0.0.2:8000")):
        idx.apply(pod, msg(0, stored_map([11 + i], None, TOKENS[:4])))
    idx.retain(["10.0.0.2:8000"])
    assert idx.addresses() == ["10.0.0.2:8000"]
    assert idx.block_size("10.0.0.1:8000") is None and idx.leading_run("10.0.0.1:8000", keys_of(TOKENS)) == 0


def test_memory_bound_from_cache_config_info() -> None:
    capacity = {POD: 5}
    idx = index(capacity_of=capacity.get, default_capacity=1000)
    tokens = list(range(40))
    idx.apply(POD, msg(0, stored_map(list(range(1, 11)), None, tokens)))  # 10 blocks, cap 5: a lost-removal flood
    assert idx.num_blocks(POD) == 5 and idx.stats.overflow == 5
    assert idx.leading_run(POD, keys_of(tokens)) == 0  # the oldest (leading) blocks went first
    chain = keys_of(tokens)
    assert all(idx.leading_run(POD, [k]) == 0 for k in chain[:5])
    assert idx.leading_run(POD, chain[5:6]) == 1
    other = "10.0.0.9:8000"  # no cache_config_info: the default bound
    idx.apply(other, msg(0, stored_map(list(range(1, 11)), None, tokens)))
    assert idx.num_blocks(other) == 10


def test_other_tiers_and_inconsistent_events_are_skipped() -> None:
    idx = index()
    idx.apply(POD, msg(0, stored_map([11], None, TOKENS[:4], medium="CPU"),
                       stored_map([12, 13], None, TOKENS[:4])))  # fmt: skip  # 2 hashes, 1 block of tokens
    assert idx.num_blocks(POD) == 0 and idx.stats.skipped == 2


def test_endpoint_and_topic_helpers() -> None:
    e = Endpoint("10.1.2.3:8000", "pod-a")
    assert port_endpoint(5557)(e) == "tcp://10.1.2.3:5557"
    assert port_endpoint(5557)(Endpoint("[fd00::1]:8000", "v6")) == "tcp://[fd00::1]:5557"
    assert topic_prefix()(e) == "kv@10.1.2.3:8000@"
    assert topic_prefix("kv@{name}@")(e) == "kv@pod-a@"
    assert topic_prefix("")(e) == ""


def test_cost_per_event_is_measured() -> None:
    idx = index()
    idx.apply(POD, msg(0, stored_map([11, 12, 13], None, TOKENS), {"type": "BlockRemoved", "block_hashes": [13]}))
    assert idx.stats.events == 2 and idx.stats.messages == 1
    assert idx.stats.apply_seconds > 0 and idx.stats.seconds_per_event == idx.stats.apply_seconds / 2


# ---- speculative entries (KVEventIndex.speculate) ------------------------------------------------


class Clock:
    """A clock the test advances by hand (``KVEventIndex(now=...)``)."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


OTHER_TOKENS = [7, 7, 7, 7]  # a block unrelated to TOKENS: publishing it makes the block size known


def publishing(clock: Clock | None = None, **kw) -> KVEventIndex:
    """An index where POD has published one block unrelated to TOKENS."""
    idx = index(now=clock or Clock(), **kw)
    idx.apply(POD, msg(0, stored_map([99], None, OTHER_TOKENS)))
    return idx


def test_speculative_entries_count_until_they_expire() -> None:
    clock = Clock()
    idx = index(now=clock)
    idx.apply(POD, msg(0, stored_map([11], None, TOKENS[:4])))  # the first block is reported, the rest not
    chain = keys_of(TOKENS)
    assert idx.leading_run(POD, chain) == 1
    assert idx.speculate(POD, chain, 2.0) is True
    assert idx.stats.speculated == 1 and idx.speculative(POD) == 3
    assert idx.leading_run(POD, chain) == 3  # reported block + speculative ones, one run
    clock.t += 1.9
    assert idx.leading_run(POD, chain) == 3
    clock.t += 0.2  # 2.1 s after the pick: expired
    assert idx.leading_run(POD, chain) == 1  # what the events reported stays
    assert idx.num_blocks(POD) == 1  # speculation never enters the reported entries


def test_a_second_pick_refreshes_the_speculative_entries() -> None:
    clock = Clock()
    idx = publishing(clock)
    chain = keys_of(TOKENS)
    idx.speculate(POD, chain, 2.0)
    clock.t += 1.5
    idx.speculate(POD, chain[:2], 2.0)  # the same prefix picked again: its two blocks live on
    clock.t += 1.0  # 2.5 s after the first pick, 1 s after the second
    assert idx.leading_run(POD, chain) == 2  # the third block's entry expired with the first pick
    assert idx.stats.speculated == 2


@pytest.mark.parametrize(
    "prepare, keys, ttl",
    [
        (lambda idx: None, keys_of(TOKENS), 2.0),
        (lambda idx: idx.apply(POD, msg(0, {"type": "AllBlocksCleared"})), keys_of(TOKENS), 2.0),
        (lambda idx: idx.apply(POD, msg(0, stored_map([99], None, OTHER_TOKENS))), keys_of(TOKENS), 0.0),
        (lambda idx: idx.apply(POD, msg(0, stored_map([99], None, OTHER_TOKENS))), [], 2.0),
    ],
    ids=["pod-never-published", "pod-published-no-block", "ttl-zero", "no-keys"],
)  # fmt: skip
def test_speculate_refuses(prepare, keys, ttl) -> None:
    idx = index(now=Clock())
    heard: list[tuple] = []
    idx.on_speculate = lambda *args: heard.append(args)
    prepare(idx)
    assert idx.speculate(POD, keys, ttl) is False
    assert idx.speculative(POD) == 0 and idx.stats.speculated == 0 and heard == []
    assert idx.leading_run(POD, keys_of(TOKENS)) == 0


def test_speculative_entries_are_bounded_by_the_pod_capacity() -> None:
    idx = publishing(capacity_of={POD: 2}.get, default_capacity=1000)
    chain = keys_of(TOKENS)
    assert idx.speculate(POD, chain, 2.0) is True
    assert idx.speculative(POD) == 2
    assert idx.leading_run(POD, chain) == 0  # the oldest (leading) entry went first
    assert idx.leading_run(POD, chain[1:]) == 2
    other = "10.0.0.9:8000"  # no cache_config_info: the default bound
    idx.apply(other, msg(0, stored_map([99], None, OTHER_TOKENS)))
    idx.speculate(other, chain, 2.0)
    assert idx.speculative(other) == 3 and idx.leading_run(other, chain) == 3


@pytest.mark.parametrize(
    "drop, other_kept",
    [
        (lambda idx: idx.reset(POD, "disconnected"), 3),
        (lambda idx: idx.apply(POD, msg(1, {"type": "AllBlocksCleared"})), 3),
        (lambda idx: idx.apply(POD, msg(7, stored_map([98], None, [6, 6, 6, 6]))), 3),
        (lambda idx: idx.apply(POD, [TOPIC, struct.pack(">Q", 1), b"\xc1"]), 3),
        (lambda idx: idx.retain(["10.0.0.2:8000"]), 3),
        (lambda idx: idx.retain([]), 0),
    ],
    ids=["reset", "all-blocks-cleared", "sequence-gap", "malformed", "left-the-pool", "pool-emptied"],
)
def test_speculative_entries_go_when_the_pod_is_reset(drop, other_kept) -> None:
    idx = publishing()
    other = "10.0.0.2:8000"
    idx.apply(other, msg(0, stored_map([99], None, OTHER_TOKENS)))
    chain = keys_of(TOKENS)
    idx.speculate(POD, chain, 2.0)
    idx.speculate(other, chain, 2.0)
    assert idx.leading_run(POD, chain) == 3
    drop(idx)
    assert idx.leading_run(POD, chain) == 0 and idx.speculative(POD) == 0
    assert idx.leading_run(other, chain) == other_kept  # other pods keep theirs


def test_on_speculate_hears_only_shared_entries() -> None:
    idx = publishing()
    other = "10.0.0.2:8000"
    idx.apply(other, msg(0, stored_map([99], None, OTHER_TOKENS)))
    heard: list[tuple] = []
    idx.on_speculate = lambda *args: heard.append(args)
    chain = keys_of(TOKENS)
    assert idx.speculate(POD, chain, 2.0) is True
    assert idx.speculate(other, chain, 1.5, share=False) is True  # a peer's pick: not told again
    assert heard == [(POD, BS, chain, 2.0)]
    assert idx.stats.speculated == 2  # own and peers' picks
    assert idx.leading_run(other, chain) == 3  # a peer's entry counts like an own one


def test_token_ids_out_of_range_reset_the_pod_instead_of_raising() -> None:
    """Token ids come from the network: one that does not fit 32 bits (or is negative) makes the
    message malformed (the pod is reset, as for any bad payload); apply never raises."""
    import struct as _struct

    import msgpack as _msgpack

    index = KVEventIndex(BlockKeys())
    for bad in (-1, 1 << 32):
        ev = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
              "token_ids": [bad] + [2] * 15, "block_size": 16}  # fmt: skip
        index.apply("10.0.0.1:8000", [b"kv@x@m", _struct.pack(">Q", 1), _msgpack.packb([1.0, [ev], 0])])
    assert index.stats.decode_errors == 2 and index.num_blocks("10.0.0.1:8000") == 0
