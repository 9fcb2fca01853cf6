"""Active-active replicas over real ZMQ sockets (``epp/datalayer/peers.py`` ``PeerLink``): two
links on 127.0.0.1, each subscribed to the other and to itself, tell each other their load.

No sleeps: a test waits for the next peer message (``PeerLink.received(n)``) until what it
expects holds, bounded by a deadline.  The first message a link publishes may reach no one
(its peer has not connected yet); the state is sent again on the next change or heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from epp.datalayer import Datastore
from epp.datalayer.peers import PeerLink, PeerSync
from epp.errors import ConfigError
from epp.scheduling import build_scheduler

from support.scheduling import EPS, m, req, store_with

DEADLINE = 5.0


@dataclass
class Replica:
    store: Datastore
    link: PeerLink

    @property
    def sync(self) -> PeerSync:
        return self.link.sync


async def until(replica: Replica, condition: Callable[[], bool]) -> None:
    """Wait for peer messages to ``replica`` until ``condition()`` holds."""
    async with asyncio.timeout(DEADLINE):
        while not condition():
            await replica.link.received(replica.sync.stats.received + 1)


@asynccontextmanager
async def replicas() -> AsyncIterator[tuple[Replica, Replica]]:
    """Two replicas over the first four of ``EPS``, linked both ways (and each to itself), running."""
    a, b = (
        Replica(store, PeerLink(PeerSync(store.load, replica_id=rid), "tcp://127.0.0.1:0", interval=0.001))
        for rid, store in (("a", store_with([m()] * 4)), ("b", store_with([m()] * 4)))
    )
    # ports are known only once bound: each lists the other and itself, as a headless Service would
    for r in (a, b):
        r.link.peers = [("127.0.0.1", a.link.port), ("127.0.0.1", b.link.port)]
    tasks = [asyncio.create_task(r.link.run()) for r in (a, b)]
    try:
        yield a, b
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        a.link.close()
        b.link.close()


def test_peers_are_parsed_and_bad_ones_and_binds_refused() -> None:
    sync = PeerSync(store_with([m()]).load)
    link = PeerLink(sync, "tcp://127.0.0.1:0", ["127.0.0.1:5557", "tcp://[::1]:6000", "epp-peers.ns.svc:7000"])
    try:
        assert link.peers == [("127.0.0.1", 5557), ("::1", 6000), ("epp-peers.ns.svc", 7000)]
        assert link.endpoint == f"tcp://127.0.0.1:{link.port}" and link.port > 0
    finally:
        link.close()
    for bad in ("127.0.0.1", ":5557", "127.0.0.1:", "127.0.0.1:port"):
        with pytest.raises(ConfigError, match=re.escape(f"a peer is host:port, got '{bad}'")):
            PeerLink(sync, "tcp://127.0.0.1:0", [bad])
    with pytest.raises(ConfigError, match=re.escape("cannot publish on 'tcp://127.0.0.1:port'")):
        PeerLink(sync, "tcp://127.0.0.1:port")


async def test_load_reaches_the_peer_and_drains_with_the_releases() -> None:
    async with replicas() as (a, b):
        tickets = [a.store.load.acquire(EPS[0], 100) for _ in range(3)] + [a.store.load.acquire(EPS[1], 10)]
        await until(b, lambda: b.sync.load.requests == {EPS[0].address: 3, EPS[1].address: 1})
        assert dict(b.sync.load.tokens) == {EPS[0].address: 300, EPS[1].address: 10}
        assert b.sync.load.peers == ["a"]
        tickets[0].release()
        await until(b, lambda: b.sync.load.requests == {EPS[0].address: 2, EPS[1].address: 1})
        for t in tickets[1:]:
            t.release()
        await until(b, lambda: not b.sync.load.requests)
        view = b.sync.load
        assert (dict(view.tokens), dict(view.unseen), dict(view.unseen_tokens)) == ({}, {}, {})
        # a hears its own messages too (it lists itself) and ignores them
        await until(a, lambda: a.sync.stats.own > 0 and a.sync.load.peers == ["b"])  # b's first message too
        assert not a.sync.load.requests
        assert b.sync.stats.rejected == 0 and a.sync.stats.rejected == 0


async def test_synced_replicas_make_the_same_picks() -> None:
    async with replicas() as (a, b):
        for _ in range(5):
            a.store.load.acquire(EPS[0])
            b.store.load.acquire(EPS[1])
        both = {EPS[0].address: 5, EPS[1].address: 5}
        await until(b, lambda: dict(b.sync.load.requests) == {EPS[0].address: 5})
        await until(a, lambda: dict(a.sync.load.requests) == {EPS[1].address: 5})
        sa = build_scheduler("least-inflight", a.store, rng=random.Random(7), peers=a.sync.load)
        sb = build_scheduler("least-inflight", b.store, rng=random.Random(7), peers=b.sync.load)
        # each sees every replica's sends: the same candidates, the same seeded tie-breaks
        assert sa.snapshot(req(), EPS[:4]).inflight == sb.snapshot(req(), EPS[:4]).inflight == [5, 5, 0, 0]
        picks_a = [sa.schedule(req(), EPS[:4])[0].address for _ in range(8)]
        picks_b = [sb.schedule(req(), EPS[:4])[0].address for _ in range(8)]
        assert picks_a == picks_b
        assert set(picks_a) == {EPS[2].address, EPS[3].address}  # never the pods the replicas loaded
        assert set(both).isdisjoint(picks_a)


async def test_flush_sends_the_whole_load_at_once() -> None:
    """``PeerLink.flush`` (what a draining App calls) publishes the replica's whole load without
    its publishing loop: here A's loop never runs, so only flush can tell B anything."""
    a_store, b_store = store_with([m()] * 4), store_with([m()] * 4)
    a = PeerLink(PeerSync(a_store.load, replica_id="a"), "tcp://127.0.0.1:0")
    b = PeerLink(PeerSync(b_store.load, replica_id="b"), "tcp://127.0.0.1:0", interval=0.001)
    b.connect(a.endpoint)
    task = asyncio.create_task(b.run())
    try:
        ticket = a_store.load.acquire(EPS[0], 5)
        async with asyncio.timeout(5):
            while b.sync.load.requests != {EPS[0].address: 1}:  # the first flushes may precede B's subscription
                await a.flush()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await b.received(b.sync.stats.received + 1)
            ticket.release()
            while b.sync.load.requests:
                await a.flush()
                await b.received(b.sync.stats.received + 1)
        assert a.sync.stats.sent >= 2 and b.sync.stats.expired == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        a.close()
        b.close()
