"""Active-active through ``epp serve``'s wiring: two in-process Apps on one pool, each with
``--peer-bind`` on 127.0.0.1, tell each other their in-flight load over real ZMQ sockets, so
a replica that sent nothing still steers around the pod its peer loaded.

No sleeps: a test waits on ``PeerLink.received`` until the view it needs holds, bounded by a
deadline.  Scraping is off (the endpoints are addresses nothing listens on: never dialled).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from epp.app import App
from epp.domain import InferenceRequest, Pick
from epp.errors import ConfigError

DEADLINE = 5.0
PODS = ["127.0.0.1:1", "127.0.0.1:2"]


async def until(app: App, holds: Callable[[], bool]) -> None:
    """Wait, one peer message at a time, until ``holds()``."""
    link = app.peer_link
    async with asyncio.timeout(DEADLINE):
        while not holds():
            await link.received(link.sync.stats.received + 1)


def request(n: int) -> InferenceRequest:
    return InferenceRequest(request_id=f"r{n}", model="m", target_model="m", prompt=f"question {n}")


async def test_a_replica_steers_around_the_pod_its_peer_loaded(write_pool, start_app) -> None:
    pool = write_pool(PODS)
    common = {"scheduling_profile": "least-inflight", "refresh_metrics_interval": 0, "peer_bind": "tcp://127.0.0.1:0"}
    a = await start_app(pool, **common)
    b = await start_app(pool, peers=(f"127.0.0.1:{a.peer_link.port}",), **common)
    a.peer_link.connect(f"tcp://127.0.0.1:{b.peer_link.port}")  # A started first: it learns B's port now
    assert a.ready_line()["peer_port"] == a.peer_link.port
    busy = a.datastore.endpoints()[0]
    claims = [a.router.acquire(Pick((busy,)), 100) for _ in range(3)]  # three requests A sent there
    await until(b, lambda: b.peer_sync.load.requests.get(busy.address) == 3)
    assert b.datastore.load.total_inflight() == 0  # B's own ledger: nothing of A's
    picks = {b.router.route(request(n)).primary.address for n in range(10)}
    assert picks == {PODS[1]}  # ties would be split at random: only A's load tells B
    for claim in claims:
        claim.release()
    await until(b, lambda: not b.peer_sync.load.requests)
    assert a.datastore.load.total_inflight() == 0
    assert a.peer_sync.stats.rejected == b.peer_sync.stats.rejected == 0


async def test_peers_without_a_bind_address_is_a_config_error(write_pool, start_app) -> None:
    with pytest.raises(ConfigError, match="--peers needs --peer-bind"):
        await start_app(write_pool(PODS), peers=("127.0.0.1:9",), refresh_metrics_interval=0)


async def test_a_peer_bind_address_in_use_is_a_config_error(write_pool, start_app) -> None:
    a = await start_app(write_pool(PODS), refresh_metrics_interval=0, peer_bind="tcp://127.0.0.1:0")
    with pytest.raises(ConfigError, match="cannot publish"):
        await start_app(write_pool(PODS), refresh_metrics_interval=0, peer_bind=f"tcp://127.0.0.1:{a.peer_link.port}")


async def test_epp_serve_kv_events_bind_collects_what_pods_publish(write_pool, start_app) -> None:
    """``--kv-events-bind``: the App binds one SUB socket (its port is in the ready line) and a
    pod's publisher connecting to it (llm-d-inference-sim's way round) fills the index."""
    import struct

    import msgpack
    import zmq
    import zmq.asyncio

    app = await start_app(write_pool(PODS), refresh_metrics_interval=0, scheduling_profile="epp-precise",
                          kv_events_bind="tcp://127.0.0.1:0")  # fmt: skip
    port = app.ready_line()["kv_events_port"]
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.XPUB)  # reads the subscription before sending (a PUB would drop the first message)
    try:
        pub.connect(f"tcp://127.0.0.1:{port}")
        async with asyncio.timeout(DEADLINE):
            assert (await pub.recv()).startswith(b"\x01kv@")
            tokens = list(range(32))
            event = {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": None, "token_ids": tokens,
                     "block_size": 16, "medium": "GPU"}  # fmt: skip
            payload = msgpack.packb([1.0, [event], 0])
            await pub.send_multipart([f"kv@{PODS[1]}@m".encode(), struct.pack(">Q", 1), payload])
            await app.kv_subscriber.received(PODS[1], 1)
        assert app.kv_index.num_blocks(PODS[1]) == 2 and app.kv_index.num_blocks(PODS[0]) == 0
    finally:
        pub.close(linger=0)
        ctx.destroy(linger=0)


async def test_sibling_workers_exchange_load_over_ipc(write_pool, start_app, socket_dir) -> None:
    """What ``epp serve --workers`` wires: no --peer-bind, each App binds its own ipc:// endpoint
    and connects to its sibling's as given (bound or not yet: ZMQ retries)."""
    pool = write_pool(PODS)
    ends = [f"ipc://{socket_dir}/peer-{i}" for i in range(2)]
    common = {"scheduling_profile": "least-inflight", "refresh_metrics_interval": 0}
    a = await start_app(pool, worker_peer_bind=ends[0], worker_peers=(ends[1],), **common)
    b = await start_app(pool, worker_peer_bind=ends[1], worker_peers=(ends[0],), **common)
    assert "peer_port" not in a.ready_line()  # no pod-to-pod endpoint
    busy = a.datastore.endpoints()[0]
    claim = a.router.acquire(Pick((busy,)), 100)
    await until(b, lambda: b.peer_sync.load.requests.get(busy.address) == 1)
    assert {b.router.route(request(n)).primary.address for n in range(5)} == {PODS[1]}
    claim.release()
    await until(b, lambda: not b.peer_sync.load.requests)


async def test_a_draining_replica_tells_its_peers_its_load_is_gone(write_pool, start_app) -> None:
    """A replica that releases its claims and drains: its peers see the load gone from its
    messages (the periodic one or the last, full one the drain sends), not by its timeout."""
    pool = write_pool(PODS)
    common = {"scheduling_profile": "least-inflight", "refresh_metrics_interval": 0, "peer_bind": "tcp://127.0.0.1:0"}
    a = await start_app(pool, **common)
    b = await start_app(pool, peers=(f"127.0.0.1:{a.peer_link.port}",), **common)
    claim = a.router.acquire(Pick((a.datastore.endpoints()[0],)), 10)
    await until(b, lambda: bool(b.peer_sync.load.requests))
    claim.release()  # released just before the drain: the last changes-only message may not have gone out
    expired_before = b.peer_sync.stats.expired
    await a.aclose()
    await until(b, lambda: not b.peer_sync.load.requests)
    assert b.peer_sync.stats.expired == expired_before  # emptied by a's last message, not by its timeout
