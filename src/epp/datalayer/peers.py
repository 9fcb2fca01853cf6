"""Active-active replicas: what each epp replica tells the others, so that they route as one.

Every replica reads the same pods' KV events and scrapes the same gauges.  What only the
replica that sent a request knows is what it sent since: its in-flight requests and prompt
tokens per pod, the part of them no scrape has shown yet ("unseen"), and the speculative
prefix entries of its picks (``KVEventIndex.speculate``).  Without that, two replicas each
see half of the burst between two scrapes and both pick the same "least loaded" pod.

:class:`PeerSync` (synchronous, the event-loop thread only) is the state: :meth:`encode`
makes one message of this replica's load (absolute values per address, not increments: once
a second every address, in between only those that changed, so a lost message is repaired
within a second and no count can leak) plus the speculative entries made since the last
message; :meth:`apply` takes a peer's.  :class:`PeerLoad` sums the peers' loads per pod: the
scheduler adds it to its own ledger (``build_scheduler(peers=)``).
A peer silent for ``peer_timeout`` seconds (3 s; replicas send at least once a second) is
dropped with everything it said.

Wire (ZMQ, two frames): ``b"epp-peer"`` and a msgpack array
``[1, replica_id, seq, full, {address: [requests, tokens, unseen, unseen_tokens]}, [[address, ttl, [key, ...]], ...]]``:
``full`` messages (the first, one a second, and one whenever a peer subscribes) carry every
address with load and replace what the peer said; the others carry only the addresses that
changed (all zeros: nothing left there), so a message costs what changed, not the pool size.

:class:`PeerLink` carries it: a PUB socket bound on ``bind`` (``tcp://<pod ip>:<port>``; one
endpoint or several, e.g. that and an ``ipc://`` one for the sibling workers of
``epp serve --workers``) and one SUB socket connected to every peer address (``host:port``
entries, resolved again every 10 s, so a headless Service's name finds every replica; a
replica hears and ignores its own messages) and to every full ZMQ endpoint in ``connect``
(``ipc://…``, ``tcp://…``, connected as given).  It publishes every ``interval`` (5 ms) when
something changed or a peer has just subscribed (the PUB side is an XPUB: it hears
subscriptions), and once a second regardless.  Messages are not authenticated: bind to the
pod network only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
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

from epp.datalayer.kvevents import CountWaiters
from epp.datalayer.ledger import LoadLedger
from epp.errors import ConfigError

__all__ = ["TOPIC", "PeerLink", "PeerLoad", "PeerStats", "PeerSync"]

log = logging.getLogger(__name__)

TOPIC = b"epp-peer"
_VERSION = 1
_HEARTBEAT = 1.0  # seconds between messages when nothing changed
_RESOLVE_EVERY = 10.0
_MAX_TTL = 60.0  # a peer's speculative entries live at most this long, whatever it says
_MAX_ADDRESSES = 65_536  # per message
_MAX_SPEC = 4_096  # speculative entries per message (and queued while nothing sends)
_MAX_KEYS = 4_096  # block keys per speculative entry
_MAX_COUNT = 1 << 40  # a count beyond this is not a load, it is a broken peer
_MAX_MESSAGE = 64 << 20  # bytes: a larger message is dropped by ZMQ (MAXMSGSIZE)


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

    def update(self, peer: str, changes: dict[str, tuple[int, int, int, int]]) -> None:
        """Apply ``peer``'s changed addresses (all zeros: nothing left there)."""
        mine = self._by_peer.setdefault(peer, {})
        for address, values in changes.items():
            old = mine.pop(address, None)
            if old is not None:
                self._add({address: old}, -1)
            if any(values):
                mine[address] = values
                self._add({address: values}, 1)

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
    spec_rejected: int = 0  # speculative entries skipped as malformed (the rest of their message counted)


class PeerSync:
    """This replica's side of the exchange (module docstring)."""

    def __init__(
        self,
        ledger: LoadLedger,
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
        self._spec: list[list[Any]] = []
        self._seen: dict[str, tuple[float, int]] = {}  # peer → (last heard, last seq)
        if ledger.changed is None:
            ledger.changed = set()  # the ledger keeps the changed addresses for us from now on
        if index is not None:
            index.on_speculate = self._speculated

    def _speculated(self, address: str, block_size: int, keys: Sequence[int], ttl: float) -> None:
        if len(self._spec) >= _MAX_SPEC:  # nothing is sending (no link running): keep the newest only
            del self._spec[: len(self._spec) - _MAX_SPEC + 1]
        self._spec.append([address, ttl, list(keys[:_MAX_KEYS])])

    @property
    def dirty(self) -> bool:
        """Something to tell since the last :meth:`encode`."""
        return bool(self._spec) or bool(self._ledger.changed) or self._seq == 0

    def _entry(self, address: str) -> list[int]:
        ledger = self._ledger
        return [ledger.requests.get(address, 0), ledger.tokens.get(address, 0), ledger.unseen.get(address, 0),
                ledger.unseen_tokens.get(address, 0)]  # fmt: skip

    def encode(self, *, full: bool = False) -> bytes:
        """One message: this replica's load (``full``: every address with load, else only the
        addresses that changed since the last message, zeros meaning none left) and the
        speculative entries since the last message.  The first message is always full."""
        ledger = self._ledger
        full = full or self._seq == 0
        if full:
            addresses: Iterable[str] = {*ledger.requests, *ledger.unseen}
        else:
            addresses = ledger.changed or ()
        load = {a: self._entry(a) for a in addresses}
        ledger.changed = set()
        self._seq += 1
        spec, self._spec = self._spec, []
        self.stats.sent += 1
        self.stats.spec_sent += len(spec)
        return bytes(msgpack.packb([_VERSION, self.replica_id, self._seq, full, load, spec]))

    def apply(self, payload: bytes) -> bool:
        """A peer's message; False (and nothing changed) when it is this replica's own or malformed.

        Peers are trusted as far as the network is (module docstring), but a message never
        raises, never sets a negative or absurd count, and is bounded in addresses and keys.
        """
        try:
            msg = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            version, peer, seq, full, raw_load, spec = msg
            if version != _VERSION or not isinstance(peer, str) or not isinstance(seq, int):
                raise ValueError("unknown version")
            if not isinstance(full, bool):
                raise ValueError("full must be a boolean")
            if peer == self.replica_id:
                self.stats.own += 1
                return False
            if len(raw_load) > _MAX_ADDRESSES or len(spec) > _MAX_SPEC:
                raise ValueError("too many addresses or speculative entries")
            load = {str(a): _counts(v) for a, v in raw_load.items()}
            entries = []
            for entry in spec:
                try:
                    address, ttl, keys = entry
                    if len(keys) > _MAX_KEYS:
                        raise ValueError("too many keys")
                    entries.append((str(address), _ttl(ttl), [_key(k) for k in keys]))
                except (ValueError, TypeError, OverflowError) as exc:  # this entry only: the load still counts
                    self.stats.spec_rejected += 1
                    log.debug("bad speculative entry from peer %s: %s", peer, exc)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, msgpack.ExtraData,
                msgpack.FormatError, msgpack.StackError) as exc:  # fmt: skip
            self.stats.rejected += 1
            log.debug("bad peer message: %s", exc)
            return False
        self.stats.received += 1
        last = self._seen.get(peer)
        if last is not None and seq <= last[1]:  # an older message (reordered) changes nothing
            return True
        self._seen[peer] = (self._now(), seq)  # only a message taken counts as the peer being alive
        if full or last is None:
            self.load.set(peer, load)
        else:  # changes only: a lost one is repaired by the next full message (at most a second away)
            self.load.update(peer, load)
        if self._index is not None:
            for address, ttl, keys in entries:
                if self._index.speculate(address, keys, ttl, share=False):
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


def _counts(value: Any) -> tuple[int, int, int, int]:
    """requests, tokens, unseen, unseen tokens: four ints in [0, _MAX_COUNT]."""
    r, t, u, ut = (int(x) for x in value)
    if not all(0 <= x <= _MAX_COUNT for x in (r, t, u, ut)):
        raise ValueError(f"a load count out of range: {value!r}")
    return r, t, u, ut


def _key(value: Any) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise ValueError(f"a block key is a 64-bit unsigned int, got {value!r}")
    return value


def _ttl(value: Any) -> float:
    """A peer's speculative time to live: finite and positive, at most ``_MAX_TTL``."""
    ttl = float(value)
    if not 0 < ttl < math.inf:
        raise ValueError(f"a speculative ttl must be a positive number, got {value!r}")
    return min(ttl, _MAX_TTL)


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
        self._pub = self._ctx.socket(zmq.XPUB)  # hears subscriptions: a new peer gets the state at once
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 1000)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not only a topic's first
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
        self._sub.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE)
        self._connected: set[str] = set()
        self._resolved: set[str] = set()  # what the peer names resolved to last time
        self._welcome = False  # a peer subscribed since the last message
        self._waiters = CountWaiters()
        self._closed = False
        for endpoint in connect:  # ZMQ connects in the background: a sibling not bound yet is retried
            self.connect(endpoint)

    @property
    def port(self) -> int:
        """The port of the first bound endpoint; 0 when it is not a ``tcp://`` one."""
        head, _, port = self.endpoint.rpartition(":")
        return int(port) if head.startswith("tcp://") and port.isdigit() else 0

    def connect(self, endpoint: str) -> None:
        """Subscribe to one more peer (a full ZMQ endpoint: ``tcp://ip:port``, ``ipc:///path``)."""
        if endpoint not in self._connected:
            self._sub.connect(endpoint)
            self._connected.add(endpoint)

    async def _resolve(self) -> None:
        """Subscribe to every address the peer names resolve to now; drop the ones they no
        longer resolve to (replicas gone in a rollout).  A name that fails to resolve keeps
        what it had."""
        loop = asyncio.get_running_loop()
        found: set[str] = set()
        failed = False
        for host, port in self.peers:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot resolve epp peer %s: %s", host, exc)
                failed = True
                continue
            for family, _, _, _, addr in infos:
                ip = str(addr[0])
                found.add(f"tcp://[{ip}]:{port}" if family == socket.AF_INET6 else f"tcp://{ip}:{port}")
        for endpoint in found:
            self.connect(endpoint)
        if not failed:
            for endpoint in self._resolved - found:
                with contextlib.suppress(zmq.ZMQError):
                    self._sub.disconnect(endpoint)
                self._connected.discard(endpoint)
            self._resolved = found

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._publish(), name="epp-peers publish")
            group.create_task(self._receive(), name="epp-peers receive")
            group.create_task(self._resolve_loop(), name="epp-peers resolve")
            group.create_task(self._subscriptions(), name="epp-peers subscriptions")

    async def _subscriptions(self) -> None:
        while True:
            if (await self._pub.recv())[:1] == b"\x01":
                self._welcome = True

    async def flush(self) -> None:
        """Send this replica's whole load now (on drain: its last claims released, peers drop them
        at once instead of after their timeout)."""
        if not self._closed:
            await self._pub.send_multipart([TOPIC, self.sync.encode(full=True)])

    async def _resolve_loop(self) -> None:
        while True:
            await self._resolve()
            await asyncio.sleep(_RESOLVE_EVERY)

    async def _publish(self) -> None:
        sync, last_full = self.sync, 0.0
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            if sync.dirty or self._welcome or now - last_full >= _HEARTBEAT:
                full = self._welcome or now - last_full >= _HEARTBEAT
                self._welcome = False
                await self._pub.send_multipart([TOPIC, sync.encode(full=full)])
                if full:
                    last_full = now
            sync.expire()

    async def _receive(self) -> None:
        while True:
            frames = await self._sub.recv_multipart()
            if len(frames) == 2:
                self.sync.apply(frames[1])
            if self._waiters:
                self._waiters.wake(None, self.sync.stats.received)

    async def received(self, n: int) -> None:
        """Return once ``n`` peer messages have been applied (tests wait on it)."""
        await self._waiters.wait(None, n, self.sync.stats.received)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._waiters.cancel()
        with contextlib.suppress(zmq.ZMQError):
            self._pub.close(linger=0)
            self._sub.close(linger=0)
        if self._own_context:
            self._ctx.destroy(linger=0)
