"""Active-active replicas: what each epp replica tells the others, so that they route as one.

Every replica reads the same pods' KV events and scrapes the same gauges.  What only the
replica that sent a request knows is what it sent since: its in-flight requests and prompt
tokens per pod, the part of them no scrape has shown yet ("unseen"), and the speculative
prefix entries of its picks (``KVEventIndex.speculate``).  Without that, two replicas each
see half of the burst between two scrapes and both pick the same "least loaded" pod.

:class:`PeerSync` (synchronous, the event-loop thread only) is the state: :meth:`encode`
makes one message of this replica's whole load (a state, not deltas: a lost or reordered
message is repaired by the next one, and no count can leak) plus the speculative entries
made since the last message; :meth:`apply` takes a peer's.  :class:`PeerLoad` sums the
peers' loads per pod: the scheduler adds it to its own ledger (``build_scheduler(peers=)``).
A peer silent for ``peer_timeout`` seconds (3 s; replicas send at least once a second) is
dropped with everything it said.

Wire (ZMQ, two frames): ``b"epp-peer"`` and a msgpack array
``[1, replica_id, seq, {address: [requests, tokens, unseen, unseen_tokens]}, [[address, ttl, [key, ...]], ...]]``.

:class:`PeerLink` carries it: a PUB socket bound on ``bind`` (``tcp://<pod ip>:<port>``; one
endpoint or several, e.g. that and an ``ipc://`` one for the sibling workers of
``epp serve --workers``) and one SUB socket connected to every peer address (``host:port``
entries, resolved again every 10 s, so a headless Service's name finds every replica; a
replica hears and ignores its own messages) and to every full ZMQ endpoint in ``connect``
(``ipc://…``, ``tcp://…``, connected as given).  It publishes every ``interval`` (5 ms) when
something changed, and once a second regardless.  Messages are not authenticated: bind to the pod network only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import msgpack  # type: ignore[import-untyped]
import zmq
import zmq.asyncio

from epp.errors import ConfigError

__all__ = ["TOPIC", "PeerLink", "PeerLoad", "PeerStats", "PeerSync"]

log = logging.getLogger(__name__)

TOPIC = b"epp-peer"
_VERSION = 1
_HEARTBEAT = 1.0  # seconds between messages when nothing changed
_RESOLVE_EVERY = 10.0


class OwnLoad(Protocol):
    """This replica's ledger (``epp.datalayer.ledger.LoadLedger``)."""

    @property
    def version(self) -> int: ...
    @property
    def requests(self) -> Mapping[str, int]: ...
    @property
    def tokens(self) -> Mapping[str, int]: ...
    @property
    def unseen(self) -> Mapping[str, int]: ...
    @property
    def unseen_tokens(self) -> Mapping[str, int]: ...


class SpecIndex(Protocol):
    """The KV-event index's speculation side (``epp.datalayer.kvevents.KVEventIndex``)."""

    on_speculate: Callable[[str, int, Sequence[int], float], None] | None

    def speculate(self, address: str, keys: Sequence[int], ttl: float, *, share: bool = True) -> bool: ...


class PeerLoad:
    """The peers' load per address, summed over live peers (a ``LoadView`` for the scheduler)."""

    def __init__(self) -> None:
        self._by_peer: dict[str, dict[str, tuple[int, int, int, int]]] = {}
        self._sums: tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]] = ({}, {}, {}, {})
        self.requests: Mapping[str, int] = MappingProxyType(self._sums[0])
        self.tokens: Mapping[str, int] = MappingProxyType(self._sums[1])
        self.unseen: Mapping[str, int] = MappingProxyType(self._sums[2])
        self.unseen_tokens: Mapping[str, int] = MappingProxyType(self._sums[3])

    @property
    def peers(self) -> list[str]:
        return list(self._by_peer)

    def set(self, peer: str, load: dict[str, tuple[int, int, int, int]]) -> None:
        """Replace everything ``peer`` said about its load."""
        self._add(self._by_peer.get(peer, {}), -1)
        self._by_peer[peer] = load
        self._add(load, 1)

    def drop(self, peer: str) -> None:
        self._add(self._by_peer.pop(peer, {}), -1)

    def total_requests(self) -> int:
        return sum(self._sums[0].values())

    def _add(self, load: dict[str, tuple[int, int, int, int]], sign: int) -> None:
        for address, values in load.items():
            for total, v in zip(self._sums, values, strict=True):
                left = total.get(address, 0) + sign * v
                if left:
                    total[address] = left
                else:
                    total.pop(address, None)


@dataclass
class PeerStats:
    sent: int = 0
    received: int = 0
    own: int = 0  # own messages heard back (a peer list that names this replica too)
    rejected: int = 0  # messages that did not decode
    expired: int = 0  # peers dropped for silence
    spec_sent: int = 0
    spec_received: int = 0


class PeerSync:
    """This replica's side of the exchange (module docstring)."""

    def __init__(
        self,
        ledger: OwnLoad,
        index: SpecIndex | None = None,
        *,
        replica_id: str | None = None,
        peer_timeout: float = 3.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replica_id = replica_id or os.urandom(8).hex()
        self.load = PeerLoad()
        self.stats = PeerStats()
        self._ledger = ledger
        self._index = index
        self._timeout = peer_timeout
        self._now = now
        self._seq = 0
        self._sent_version = -1
        self._spec: list[list[Any]] = []
        self._seen: dict[str, tuple[float, int]] = {}  # peer → (last heard, last seq)
        if index is not None:
            index.on_speculate = self._speculated

    def _speculated(self, address: str, block_size: int, keys: Sequence[int], ttl: float) -> None:
        self._spec.append([address, ttl, list(keys)])

    @property
    def dirty(self) -> bool:
        """Something to tell since the last :meth:`encode`."""
        return bool(self._spec) or self._ledger.version != self._sent_version

    def encode(self) -> bytes:
        """This replica's load now, and the speculative entries since the last message."""
        ledger = self._ledger
        tokens, unseen, unseen_tokens = ledger.tokens, ledger.unseen, ledger.unseen_tokens
        load = {
            a: [r, tokens.get(a, 0), unseen.get(a, 0), unseen_tokens.get(a, 0)]
            for a, r in ledger.requests.items()
        }
        for a, u in unseen.items():  # unseen without in-flight: mirrored copies
            if a not in load:
                load[a] = [0, 0, u, unseen_tokens.get(a, 0)]
        self._seq += 1
        self._sent_version = ledger.version
        spec, self._spec = self._spec, []
        self.stats.sent += 1
        self.stats.spec_sent += len(spec)
        return bytes(msgpack.packb([_VERSION, self.replica_id, self._seq, load, spec]))

    def apply(self, payload: bytes) -> bool:
        """A peer's message; False (and nothing changed) when it is this replica's own or malformed."""
        try:
            msg = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            version, peer, seq, raw_load, spec = msg
            if version != _VERSION or not isinstance(peer, str) or not isinstance(seq, int):
                raise ValueError("unknown version")
            if peer == self.replica_id:
                self.stats.own += 1
                return False
            load = {str(a): (int(v[0]), int(v[1]), int(v[2]), int(v[3])) for a, v in raw_load.items()}
            entries = [(str(a), float(ttl), [int(k) for k in keys]) for a, ttl, keys in spec]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, msgpack.ExtraData,
                msgpack.FormatError, msgpack.StackError) as exc:  # fmt: skip
            self.stats.rejected += 1
            log.debug("bad peer message: %s", exc)
            return False
        self.stats.received += 1
        last = self._seen.get(peer)
        self._seen[peer] = (self._now(), seq)
        if last is None or seq > last[1]:  # an older message (reordered) changes nothing
            self.load.set(peer, load)
        if self._index is not None:
            for address, ttl, keys in entries:
                self._index.speculate(address, keys, ttl, share=False)
                self.stats.spec_received += 1
        return True

    def expire(self) -> list[str]:
        """Drop peers silent for longer than ``peer_timeout``; returns them."""
        cutoff = self._now() - self._timeout
        gone = [p for p, (t, _) in self._seen.items() if t < cutoff]
        for p in gone:
            del self._seen[p]
            self.load.drop(p)
            self.stats.expired += 1
        return gone


def _split(entry: str) -> tuple[str, int]:
    host, sep, port = entry.strip().removeprefix("tcp://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"a peer is host:port, got {entry!r}")
    return host.strip("[]"), int(port)


class PeerLink:
    """ZMQ transport for a :class:`PeerSync` (module docstring).  ``run()`` until cancelled."""

    def __init__(
        self,
        sync: PeerSync,
        bind: str | Sequence[str],
        peers: Iterable[str] = (),
        *,
        connect: Iterable[str] = (),
        interval: float = 0.005,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.sync = sync
        self.interval = interval
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 1000)
        self.endpoints: list[str] = []  # what each bind resolved to (a tcp port 0 becomes the bound port)
        where = bind
        try:
            self.peers = [_split(p) for p in peers]
            for where in [bind] if isinstance(bind, str) else bind:
                self._pub.bind(where)
                self.endpoints.append(self._pub.getsockopt_string(zmq.LAST_ENDPOINT))
            if not self.endpoints:
                raise ValueError("nowhere to publish")
        except (zmq.ZMQError, ValueError) as exc:
            self._pub.close(linger=0)
            if self._own_context:
                self._ctx.destroy(linger=0)
            raise ConfigError(f"epp peers: cannot publish on {where!r}: {exc}") from None
        self.endpoint: str = self.endpoints[0]
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
        self._connected: set[str] = set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._closed = False
        for endpoint in connect:  # ZMQ connects in the background: a sibling not bound yet is retried
            self.connect(endpoint)

    @property
    def port(self) -> int:
        """The port of the first bound endpoint (a ``tcp://`` one)."""
        return int(self.endpoint.rsplit(":", 1)[1])

    def connect(self, endpoint: str) -> None:
        """Subscribe to one more peer (a full ZMQ endpoint: ``tcp://ip:port``, ``ipc:///path``)."""
        if endpoint not in self._connected:
            self._sub.connect(endpoint)
            self._connected.add(endpoint)

    async def _resolve(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.peers:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot resolve epp peer %s: %s", host, exc)
                continue
            for family, _, _, _, addr in infos:
                ip = str(addr[0])
                self.connect(f"tcp://[{ip}]:{port}" if family == socket.AF_INET6 else f"tcp://{ip}:{port}")

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._publish(), name="epp-peers publish")
            group.create_task(self._receive(), name="epp-peers receive")
            group.create_task(self._resolve_loop(), name="epp-peers resolve")

    async def _resolve_loop(self) -> None:
        while True:
            await self._resolve()
            await asyncio.sleep(_RESOLVE_EVERY)

    async def _publish(self) -> None:
        sync, last = self.sync, 0.0
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            if sync.dirty or now - last >= _HEARTBEAT:
                await self._pub.send_multipart([TOPIC, sync.encode()])
                last = now
            sync.expire()

    async def _receive(self) -> None:
        while True:
            frames = await self._sub.recv_multipart()
            if len(frames) == 2:
                self.sync.apply(frames[1])
            if self._waiters:
                n = self.sync.stats.received
                for w in [w for w in self._waiters if w[0] <= n]:
                    self._waiters.remove(w)
                    if not w[1].done():
                        w[1].set_result(None)

    async def received(self, n: int) -> None:
        """Return once ``n`` peer messages have been applied (tests wait on it)."""
        if self.sync.stats.received >= n:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        await fut

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        with contextlib.suppress(zmq.ZMQError):
            self._pub.close(linger=0)
            self._sub.close(linger=0)
        if self._own_context:
            self._ctx.destroy(linger=0)
