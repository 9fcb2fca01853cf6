"""The bind-mode KV-event collector (``epp/datalayer/kvcollect.py``) with real ZMQ publishers
connecting to it on 127.0.0.1.

No sleeps: each publisher is an XPUB socket, which reads the collector's subscription before
it sends (a plain PUB drops what it sends before that), and the test then waits until the
collector has applied the messages (``received``), bounded by a deadline.  ZMQ keeps one
publisher's messages in order, so a dropped message is known to be processed once a later
message from the same publisher has been applied.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import msgpack
import pytest
import zmq
import zmq.asyncio

from epp.datalayer.kvcollect import KVEventCollector, pod_of_topic
from epp.datalayer.kvevents import KVEventIndex
from epp.domain import Endpoint
from epp.errors import ConfigError
from epp.scheduling.blockkeys import BlockKeys

from support.kvevents import running_collectors

BS = 4
DEADLINE = 5.0
A, B = "127.0.0.1:8000", "127.0.0.1:8001"
C = "10.0.0.3:8000"  # the only endpoint with its ip: a bare-ip topic names it
POOL = [Endpoint(A, "a"), Endpoint(B, "b"), Endpoint(C, "c")]


def stored(hashes: list[int], tokens: list[int], parent: int | None = None) -> dict[str, object]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": BS, "medium": "GPU"}  # fmt: skip


def message(topic: str, seq: int, *events: object) -> list[bytes]:
    return [topic.encode(), struct.pack(">Q", seq), msgpack.packb([1.0, list(events), 0])]


class Publisher:
    """A pod's publisher: an XPUB that connects to the collector and numbers its messages from 1."""

    def __init__(self, sock: zmq.asyncio.Socket, topic: str) -> None:
        self.sock = sock
        self.topic = topic
        self.seq = 0

    async def send(self, *events: object, topic: str | None = None) -> None:
        self.seq += 1
        await self.sock.send_multipart(message(topic or self.topic, self.seq, *events))


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    c = zmq.asyncio.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
async def running() -> AsyncIterator[Callable[[KVEventCollector], KVEventCollector]]:
    """Run collectors as tasks; cancelled, then closed, after the test."""
    async with running_collectors() as run:
        yield run


def collector(ctx: zmq.asyncio.Context, **kw: object) -> KVEventCollector:
    c = KVEventCollector(KVEventIndex(BlockKeys()), "tcp://127.0.0.1:0", context=ctx, **kw)  # type: ignore[arg-type]
    c.follow(POOL)
    return c


async def publisher(ctx: zmq.asyncio.Context, c: KVEventCollector, topic: str, stack: AsyncExitStack) -> Publisher:
    sock = ctx.socket(zmq.XPUB)
    stack.callback(sock.close, 0)
    sock.connect(c.endpoint)
    async with asyncio.timeout(DEADLINE):
        assert await sock.recv() == b"\x01kv@"  # the collector's subscription reached this publisher
    return Publisher(sock, topic)


@pytest.mark.parametrize(
    "topic, pod",
    [(b"kv@10.0.0.1:8000@/model/llama2", "10.0.0.1:8000"), (b"kv@10.0.0.1@m@x", "10.0.0.1"),
     (b"kv@pod-0", "pod-0"), (b"kv@@m", None), (b"kv", None), (b"vllm@a@m", None), (b"", None)],
    ids=["ip-port", "bare-ip-at-in-model", "no-model", "empty-pod", "no-pod", "other-prefix", "empty"],
)  # fmt: skip
def test_pod_of_topic(topic: bytes, pod: str | None) -> None:
    assert pod_of_topic(topic) == pod


def test_default_mapping_follows_the_pool(ctx: zmq.asyncio.Context) -> None:
    c = collector(ctx)
    try:
        assert [c.address_for(p) for p in (A, "127.0.0.1", "10.0.0.3", C, "10.0.0.3:9", "10.9.9.9")] == [
            A, None, C, C, None, None]  # fmt: skip
        c.follow([Endpoint("[::1]:8000", "v6")])
        assert (c.address_for("::1"), c.address_for("[::1]:8000"), c.address_for(A)) == ("[::1]:8000",) * 2 + (None,)
    finally:
        c.close()


def test_binds_port_zero_and_refuses_a_taken_port(ctx: zmq.asyncio.Context) -> None:
    c = collector(ctx)
    try:
        assert c.port > 0 and c.endpoint == f"tcp://127.0.0.1:{c.port}"
        with pytest.raises(ConfigError, match="cannot bind the KV-event collector"):
            KVEventCollector(KVEventIndex(BlockKeys()), c.endpoint)
    finally:
        c.close()
        c.close()  # idempotent


async def test_topics_route_to_pods_and_unknown_pods_are_dropped(ctx, running) -> None:
    c = collector(ctx)
    running(c)
    async with AsyncExitStack() as stack:
        pub = await publisher(ctx, c, f"kv@{A}@m", stack)
        await pub.send(stored([1], [1, 2, 3, 4]), topic="kv@10.9.9.9@m")  # no such pod
        await pub.send(stored([2], [1, 2, 3, 4]), topic="kv@127.0.0.1@m")  # two pods have that ip
        await pub.send(stored([3], [1, 2, 3, 4]), topic="kv@@m")  # no pod at all
        await pub.send(stored([4], [5, 6, 7, 8]), topic="kv@10.0.0.3@m")  # bare ip, one pod has it
        await pub.send(stored([5, 6], list(range(8))))
        async with asyncio.timeout(DEADLINE):
            await c.connected(1)
            await c.received(A, 1)
            await c.received(C, 1)
        assert (c.stats.messages, c.stats.applied, c.stats.unknown, c.stats.bad_topic) == (5, 2, 2, 1)
        assert c.stats.unknown_pods == {"10.9.9.9": 1, "127.0.0.1": 1}
        assert (c.index.num_blocks(A), c.index.num_blocks(C), c.index.num_blocks(B)) == (2, 1, 0)
        keys = BlockKeys()
        assert c.index.leading_run(A, keys.chain(keys.root("m"), list(range(8)), BS)) == 2


async def test_two_publishers_share_the_socket(ctx, running) -> None:
    c = collector(ctx)
    running(c)
    async with AsyncExitStack() as stack:
        pa = await publisher(ctx, c, f"kv@{A}@m", stack)
        pb = await publisher(ctx, c, f"kv@{B}@m", stack)
        for i in range(20):  # interleaved, each numbering its own messages from 1
            await pa.send(stored([100 + i], [i] * BS, parent=100 + i - 1 if i else None))
            await pb.send(stored([200 + i], [i] * BS, parent=200 + i - 1 if i else None))
        async with asyncio.timeout(DEADLINE):
            await c.received(A, 20)
            await c.received(B, 20)
        assert (c.index.last_seq(A), c.index.last_seq(B)) == (20, 20)
        assert c.index.stats.gaps == 0 and c.index.stats.orphans == 0
        keys = BlockKeys()
        chain = keys.chain(keys.root("m"), [i for i in range(20) for _ in range(BS)], BS)
        assert (c.index.leading_run(A, chain), c.index.leading_run(B, chain)) == (20, 20)


async def test_custom_mapping_and_pods_leaving(ctx, running) -> None:
    names = {"sim-0": A}
    c = collector(ctx, address_of_topic=names.get)
    running(c)
    async with AsyncExitStack() as stack:
        pub = await publisher(ctx, c, "kv@sim-0@m", stack)
        await pub.send(stored([1], [1, 2, 3, 4]), topic=f"kv@{A}@m")  # the mapping knows names only
        await pub.send(stored([2], [1, 2, 3, 4]))
        async with asyncio.timeout(DEADLINE):
            await c.received(A, 1)
        assert c.index.num_blocks(A) == 1 and c.stats.unknown == 1
        c.follow(POOL[1:])  # A left the pool
        assert A not in c.index.addresses()


async def test_close_cancels_waiters(ctx) -> None:
    c = collector(ctx)
    waiter = asyncio.ensure_future(c.received(A, 1))
    await asyncio.sleep(0)  # let the waiter register (no message can come: nothing runs the collector)
    c.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter
