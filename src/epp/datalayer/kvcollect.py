"""KV events in bind mode: one ZMQ SUB socket that epp binds and every pod's publisher connects to.

llm-d-inference-sim (``--zmq-endpoint``) and llm-d's own indexer work this way round: the pod
*connects* a PUB socket to the collector's address, and each message's topic,
``kv@<pod>@<model>``, says which pod sent it.  :class:`KVEventCollector` subscribes to a
topic prefix (default ``kv@``), maps ``<pod>`` to a pool address with ``address_of_topic``
and hands the message to :meth:`KVEventIndex.apply`, which keeps sequence numbers per
address, so many publishers can share the one socket as long as their topics differ.

The default mapping, :meth:`KVEventCollector.address_for`, accepts ``<pod>`` as an
``ip:port`` of the pool or as a bare ``ip`` that exactly one pool endpoint has (the
simulator names the topic after ``POD_IP``, without a port).  Messages from pods it
cannot map are counted (``stats.unknown``) and dropped.  Unlike the per-pod subscriber a
bound socket cannot tell which pod disconnected; a restarted publisher numbers its
messages from the start again, which the index treats as a restart and rebuilds from.

Reads never block the event loop (``zmq.asyncio``; queued messages are drained with
non-blocking reads, yielding to the loop every ``_YIELD_EVERY``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from epp.datalayer.kvevents import MAX_MESSAGE, CountWaiters, KVEventIndex
from epp.domain import Endpoint
from epp.errors import ConfigError

__all__ = ["DEFAULT_BIND", "KVCollectStats", "KVEventCollector", "pod_of_topic"]

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:5557"  # llm-d-inference-sim's default --zmq-endpoint
_YIELD_EVERY = 64
_UNKNOWN_KEPT = 64  # distinct unknown pod names remembered (they come from the network)


def pod_of_topic(topic: bytes) -> str | None:
    """``kv@<pod>@<model>`` (or ``kv@<pod>``) → ``<pod>``; None for any other topic."""
    parts = topic.decode("utf-8", "replace").split("@", 2)
    return parts[1] if len(parts) >= 2 and parts[0] == "kv" and parts[1] else None


@dataclass
class KVCollectStats:
    """Counts since the collector was made."""

    messages: int = 0  # received, whatever became of them
    applied: int = 0  # handed to the index
    unknown: int = 0  # dropped: the topic names no pod of the pool
    bad_topic: int = 0  # dropped: not ``kv@<pod>@<model>``
    unknown_pods: dict[str, int] = field(default_factory=dict)  # the first _UNKNOWN_KEPT names


class KVEventCollector:
    """One bound ZMQ SUB socket feeding a :class:`KVEventIndex` (module docstring).

    ``bind`` is a ZMQ endpoint; port 0 binds a free port (:attr:`port`, :attr:`endpoint`
    say which).  :meth:`follow` tells it the pool (for the default topic mapping; a pod
    that leaves is forgotten by the index); :meth:`run` reads until cancelled;
    ``await received(address, n)`` returns once ``n`` messages of that pod were applied
    and ``await connected(n)`` once ``n`` publishers have completed the ZMTP handshake
    (tests wait on them instead of sleeping).
    """

    def __init__(
        self,
        index: KVEventIndex,
        bind: str = DEFAULT_BIND,
        *,
        topic: str = "kv@",
        address_of_topic: Callable[[str], str | None] | None = None,
        context: zmq.asyncio.Context | None = None,
        rcvhwm: int = 100_000,
    ) -> None:
        self.index = index
        self.stats = KVCollectStats()
        self._address_of = address_of_topic or self.address_for
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._by_address: dict[str, str] = {}
        self._by_ip: dict[str, str | None] = {}  # None: more than one endpoint has that ip
        self._waiters = CountWaiters()
        self._handshakes = 0
        self._handshake = asyncio.Condition()
        self._closed = False
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)  # from the network: a larger message is dropped
        self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            sock.bind(bind)
        except zmq.ZMQError as exc:
            sock.disable_monitor()
            self._monitor.close(linger=0)
            sock.close(linger=0)
            if self._own_context:
                self._ctx.destroy(linger=0)
            raise ConfigError(f"cannot bind the KV-event collector at {bind}: {exc}") from None
        self._sock = sock
        self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        head, _, port = self.endpoint.rpartition(":")
        self.port: int = int(port) if head.startswith("tcp://") and port.isdigit() else 0  # 0: ipc:// and others

    # ---- topic → pod address -----------------------------------------------------------------
    def follow(self, endpoints: Iterable[Endpoint]) -> None:
        """The pool's endpoints (call it on every pool change): the default mapping's table;
        the index forgets pods that left."""
        by_address: dict[str, str] = {}
        by_ip: dict[str, str | None] = {}
        for e in endpoints:
            by_address[e.address] = e.address
            by_ip[e.ip] = None if e.ip in by_ip else e.address
        gone = [a for a in self._by_address if a not in by_address]
        self._by_address, self._by_ip = by_address, by_ip
        for address in gone:
            self.index.forget(address)

    def address_for(self, pod: str) -> str | None:
        """The default mapping: an ``ip:port`` of the pool, or an ``ip`` exactly one endpoint has."""
        return self._by_address.get(pod) or self._by_ip.get(pod.strip("[]"))

    def _route(self, frames: Sequence[bytes]) -> str | None:
        self.stats.messages += 1
        pod = pod_of_topic(frames[0]) if frames else None
        if pod is None:
            self.stats.bad_topic += 1
            return None
        address = self._address_of(pod)
        if address is None:
            self.stats.unknown += 1
            known = self.stats.unknown_pods
            if pod in known or len(known) < _UNKNOWN_KEPT:
                if pod not in known:
                    log.debug("KV events from an unknown pod %r dropped", pod)
                known[pod] = known.get(pod, 0) + 1
            return None
        self.index.apply(address, frames)
        self.stats.applied += 1
        return address

    # ---- the loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Read the socket until cancelled (run it as a supervised task)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch(), name="kv-collect monitor")
            await self._read()

    async def _read(self) -> None:
        sock = self._sock
        # As KVEventSubscriber._read: queued messages are drained through a synchronous view of
        # the same socket with non-blocking reads, at most _YIELD_EVERY per turn.
        drain: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        while True:
            touched = {self._route(await sock.recv_multipart())}
            for _ in range(_YIELD_EVERY):
                try:
                    msg = drain.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                touched.add(self._route(msg))
            else:
                await asyncio.sleep(0)
            if self._waiters:
                for address in touched:
                    if address is not None:
                        self._waiters.wake(address, self.index.messages(address))

    async def _watch(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshakes += 1
                async with self._handshake:
                    self._handshake.notify_all()

    # ---- waiting (tests) -----------------------------------------------------------------------
    async def received(self, address: str, n: int) -> None:
        """Return once ``n`` messages from ``address`` have been applied (counted since it was first seen)."""
        await self._waiters.wait(address, n, self.index.messages(address))

    async def connected(self, n: int = 1) -> None:
        """Return once ``n`` publisher connections have completed the handshake (counted since made;
        needs :meth:`run`).  A publisher may still drop messages until it has read the subscription."""
        async with self._handshake:
            await self._handshake.wait_for(lambda: self._handshakes >= n)

    def close(self) -> None:
        """Close the socket (idempotent); cancel :meth:`run` separately (the supervisor does)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._waiters.cancel()
        if self._own_context:
            self._ctx.destroy(linger=0)
