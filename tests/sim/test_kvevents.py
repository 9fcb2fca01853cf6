"""The simulator's KV-cache events (`epp_sim/kvevents.py`): vLLM's wire format, the prefix cache
as their source of truth, the virtual-time fleet's events, and the ZMQ publisher (real sockets on
127.0.0.1; `test_pod_publishes_over_zmq` starts a pod's HTTP server too)."""

from __future__ import annotations

import asyncio
import random
import struct

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from epp.datalayer import kvevents as epp_kv
from epp.scheduling.blockkeys import BlockKeys
from epp_sim.cli import build_parser, pod_config
from epp_sim.domain import EngineConfig, SimRequest
from epp_sim.engine import Engine
from epp_sim.fleet import TraceRequest, VirtualFleet, round_robin
from epp_sim.kvevents import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventLog,
    KVEventPublisher,
    decode_batch,
    encode_batch,
)
from epp_sim.profiles import FAST
from epp_sim.server import PodConfig, SimFleet
from epp_sim.tokenizer import block_token_ids, tokenize

from support.sim import text_of

STORED = BlockStored((1, 2**64 - 1), 7, tuple(range(32)), 16, None, "GPU", "sql-lora")
EVENTS = [STORED, BlockRemoved((3,)), AllBlocksCleared()]
# What vLLM puts on the wire for EVENTS, built by hand from its msgspec structs.
VLLM_MAP = msgpack.packb([1.25, [
    {"type": "BlockStored", "block_hashes": [1, 2**64 - 1], "parent_block_hash": 7, "token_ids": list(range(32)),
     "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": "sql-lora"},
    {"type": "BlockRemoved", "block_hashes": [3], "medium": "GPU"},
    {"type": "AllBlocksCleared"},
], 0])  # fmt: skip
VLLM_ARRAY = msgpack.packb([1.25, [
    ["BlockStored", [1, 2**64 - 1], 7, list(range(32)), 16, None, "GPU", "sql-lora"],
    ["BlockRemoved", [3], "GPU"],
    ["AllBlocksCleared"],
], 0])  # fmt: skip


@pytest.mark.parametrize("form, wire", [("map", VLLM_MAP), ("array", VLLM_ARRAY)], ids=["map", "array"])
def test_encoding_is_vllms_and_round_trips(form, wire) -> None:
    assert encode_batch(1.25, EVENTS, 0, form) == wire
    assert decode_batch(wire) == (1.25, EVENTS, 0)
    # and epp's decoder reads what the simulator writes
    batch = epp_kv.decode_batch(wire)
    assert batch.events == [
        epp_kv.BlockStored((1, 2**64 - 1), 7, list(range(32)), 16, None, "GPU", "sql-lora"),
        epp_kv.BlockRemoved((3,), "GPU"),
        epp_kv.AllBlocksCleared(),
    ]


def test_token_ids_of_a_text_prompt_are_its_bytes() -> None:
    p = tokenize("abcd" * 32, 16)
    assert block_token_ids(p, 1, 16) == struct.unpack("<16I", b"abcd" * 16)
    ids = tuple(range(40))
    assert block_token_ids(tokenize_ids_prompt(ids), 1, 16) == ids[16:32]


def tokenize_ids_prompt(ids):
    from epp_sim.tokenizer import tokenize_ids

    return tokenize_ids(ids, 16)


def run_engine(engine: Engine, prompts: list[str], max_tokens: int = 4) -> None:
    t = 0.0
    for i, text in enumerate(prompts):
        engine.add_request(SimRequest(str(i), tokenize(text, 16), max_tokens, t))
        while (due := engine.next_event_time()) is not None:
            engine.advance(due)
            t = due


def test_events_replay_to_the_prefix_cache_and_epp_keys_match_it() -> None:
    engine = Engine(EngineConfig(profile=FAST, num_gpu_blocks=60, max_num_seqs=2))  # small: evictions
    engine.kv.events = log = EventLog()
    rng = random.Random(3)
    heads = [text_of(rng.randint(40, 200), f"head{g}") for g in range(4)]
    prompts = [rng.choice(heads) + text_of(rng.randint(1, 120), f"user{i}") for i in range(30)]
    held: set[int] = set()
    idx = epp_kv.KVEventIndex(BlockKeys())
    for seq, text in enumerate(prompts):
        run_engine(engine, [text])
        events = log.drain()
        for ev in events:
            if isinstance(ev, BlockStored):
                held.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                held.difference_update(ev.block_hashes)
        idx.apply("pod", [b"kv@pod@m", struct.pack(">Q", seq), encode_batch(0.0, events)])
        assert held == set(engine.kv._ref)  # the log is the prefix table's history
    assert idx.stats.blocks_removed > 0 and idx.stats.orphans == 0
    keys = BlockKeys()
    for text in heads + prompts:
        p = tokenize(text, 16)
        truth = engine.kv.match(p.block_hashes, len(p.block_hashes))
        assert idx.leading_run("pod", keys.prompt_keys(text, "m", 16)) == truth


def test_clear_is_all_blocks_cleared_and_refused_while_blocks_are_in_use() -> None:
    engine = Engine(EngineConfig(profile=FAST, num_gpu_blocks=200))
    engine.kv.events = log = EventLog()
    run_engine(engine, [text_of(64, "a")])
    log.drain()
    engine.add_request(SimRequest("busy", tokenize(text_of(64, "a"), 16), 50, 10.0))
    engine.advance(10.0)  # admitted: its hit blocks are referenced
    assert not engine.kv.clear() and log.drain() == []
    engine.abort(engine.running[0], 10.0)
    assert engine.kv.clear() and log.drain() == [AllBlocksCleared()] and engine.kv.num_cached == 0


def test_fleet_publishes_in_virtual_time_and_restarts_from_seq_zero() -> None:
    got: list[tuple[int, int, float, list]] = []

    def on_kv(pod: int, frames) -> None:
        ts, events, _ = decode_batch(frames[2])
        got.append((pod, struct.unpack(">Q", frames[1])[0], ts, events))
        assert frames[0] == f"kv@pod-{pod}@".encode()

    cfg = EngineConfig(profile=FAST, num_gpu_blocks=4096)
    trace = [TraceRequest(0.01 * i, text_of(100, f"r{i % 3}"), 4) for i in range(12)]
    fleet = VirtualFleet([cfg] * 2, round_robin(), on_kv_events=on_kv, kv_event_lag=0.002,
                         faults=[(0.055, 0, "restart"), (0.2, 1, "clear")])  # fmt: skip
    results = fleet.run(trace)
    assert len(results) == 12
    seqs = {p: [s for q, s, _, _ in got if q == p] for p in (0, 1)}
    restart = seqs[0].index(0, 1)  # pod 0 numbers from 0 again after its restart
    assert seqs[0][:restart] == list(range(restart)) and seqs[0][restart:] == list(range(len(seqs[0]) - restart))
    assert seqs[1] == list(range(len(seqs[1])))
    assert got[-1][0] == 1 and got[-1][3] == [AllBlocksCleared()]  # the reset at 0.2 s, after the last finish
    assert all(ts <= 0.2 for _, _, ts, _ in got)
    assert fleet.engines[1].kv.num_cached == 0


def test_cli_flags_reach_the_pod_config() -> None:
    args = build_parser().parse_args(["--kv-events-endpoint", "tcp://127.0.0.1:0", "--kv-events-format", "array",
                                      "--kv-events-topic", "kv@{name}@{model}"])  # fmt: skip
    cfg = pod_config(args)
    assert (cfg.kv_events_endpoint, cfg.kv_events_form, cfg.kv_events_topic) == (
        "tcp://127.0.0.1:0", "array", "kv@{name}@{model}")  # fmt: skip
    assert pod_config(build_parser().parse_args([])).kv_events_endpoint is None


async def test_publisher_frames_over_zmq() -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:0", "kv@a@m", form="array")
    pub.start()
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
        sub.connect(pub.endpoint)
        await asyncio.wait_for(pub.subscribed(), 5)
        assert pub.publish([]) is None  # nothing to say: no message
        assert pub.publish(EVENTS, ts=1.25) == 0 and pub.publish([AllBlocksCleared()], ts=2.0) == 1
        first = await asyncio.wait_for(sub.recv_multipart(), 5)
        second = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert first == [b"kv@a@m", struct.pack(">Q", 0), VLLM_ARRAY]
        assert second[1] == struct.pack(">Q", 1)
    finally:
        sub.close(linger=0)
        ctx.destroy(linger=0)
        await pub.aclose()


async def test_pod_publishes_over_zmq_and_restarts_its_sequence() -> None:
    cfg = PodConfig(engine=EngineConfig(profile=FAST, num_gpu_blocks=4096), kv_events_endpoint="tcp://127.0.0.1:0")
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    async with SimFleet(cfg, 2) as fleet, aiohttp.ClientSession() as http:
        pod = fleet.pods[0]
        assert pod.kv_events is not None and pod.kv_events.topic == f"kv@{pod.address}@/model/llama2"
        assert fleet.pods[1].kv_events is not None and fleet.pods[1].kv_events.endpoint != pod.kv_events.endpoint
        try:
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(pod.kv_events.endpoint)
            await asyncio.wait_for(pod.kv_events.subscribed(), 5)
            body = {"prompt": text_of(40, "hello"), "max_tokens": 2}
            async with http.post(pod.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
            topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
            _, events, rank = decode_batch(payload)
            assert (topic, seq, rank) == (pod.kv_events.topic.encode(), struct.pack(">Q", 0), 0)
            assert [type(e) for e in events] == [BlockStored] and len(events[0].block_hashes) == 2  # 40 tokens: 2 full
            # a pending read lets libzmq process the reconnect (it re-sends the subscription then)
            reading = asyncio.ensure_future(sub.recv_multipart())
            await pod.restart()
            await asyncio.wait_for(pod.kv_events.subscribed(), 5)  # the subscriber reconnected
            async with http.post(pod.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
            _, seq, payload = await asyncio.wait_for(reading, 5)
            assert seq == struct.pack(">Q", 0)  # a new process numbers from 0
            assert len(decode_batch(payload)[1][0].block_hashes) == 2  # its cache was empty: stored again
        finally:
            sub.close(linger=0)
            ctx.destroy(linger=0)
