"""KV-cache events from the pods: what each pod's prefix cache holds, as the pod reports it.

vLLM (``--kv-events-config``) and epp-sim (``--kv-events-endpoint``) publish over ZMQ PUB
one message per engine step: three frames, topic (``kv@<pod>@<model>``), an 8-byte
big-endian sequence number, and a msgpack ``EventBatch`` ``[ts, events, data_parallel_rank]``
whose events are ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``, each a map
tagged by ``"type"`` (vLLM since 2026-06) or the older positional array
``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
lora_name]``.  :func:`decode_batch` reads both forms.

:class:`KVEventIndex` (synchronous, the event-loop thread only, no locks) keeps per pod:

* the engine hash → block key map of the blocks it holds, oldest first, and a count per key
  (``epp.scheduling.blockkeys`` computes keys from the events' token ids, chained from the
  parent's key, so epp never needs the engine's own hash function);
* the last sequence number: a gap, a sequence going backwards (the pod restarted) or a
  payload that does not decode drops the pod's entries, and the index rebuilds from the
  events that follow (a block whose parent it never saw cannot be keyed: counted as an
  orphan and skipped);
* a bound on entries, ``capacity_of(address)`` (``num_gpu_blocks`` from the pod's
  ``cache_config_info``) or ``default_capacity``: past it the oldest entries go (a publisher
  that loses ``BlockRemoved`` events cannot grow the index without limit).

``AllBlocksCleared``, a disconnect (:class:`KVEventSubscriber`) and the pod leaving the pool
(:meth:`KVEventIndex.retain`) drop a pod's entries as well.

*Speculative* entries (:meth:`KVEventIndex.speculate`) cover the gap between a pick and the
pod's report: a pod publishes a prompt's blocks only once its prefill has run (tens to
hundreds of ms under load), so a burst of requests sharing a new prefix would otherwise see
no holder and spread over the pool, duplicating the prefix where memory is shortest.  epp's
own picks (and, through ``epp.datalayer.peers``, its peer replicas' picks) are entered with a
time to live (2 s by default); they count as held until they expire or the pod is reset.
``on_speculate`` (when set) hears every local speculation, for sharing with peers.  Only the GPU tier
(``medium`` ``GPU`` or absent) and the first KV-cache group are indexed.

:class:`KVEventSubscriber` owns one ZMQ SUB socket per pod (``zmq.asyncio``: reads never
block the event loop; queued messages are drained with non-blocking reads, yielding to the loop
every ``_YIELD_EVERY``), follows
pool membership (:meth:`follow`, cheap when nothing changed) and runs as one supervised task
(:meth:`run`).  Applying a message is timed: ``stats.apply_seconds / stats.events`` is the
cost per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import msgpack  # type: ignore[import-untyped]
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from epp.domain import Endpoint

__all__ = [
    "DEFAULT_CAPACITY",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "CountWaiters",
    "EventBatch",
    "KVEventIndex",
    "KVEventStats",
    "KVEventSubscriber",
    "KeyChain",
    "decode_batch",
    "port_endpoint",
    "topic_prefix",
]

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 31_250  # blocks per pod when cache_config_info is unknown (the reference's default)
_U64 = (1 << 64) - 1
MAX_MESSAGE = 64 << 20  # bytes: a larger KV-event message is dropped by ZMQ (MAXMSGSIZE)
_SEQ = struct.Struct(">Q")
_YIELD_EVERY = 64


class BlockStored(NamedTuple):
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: Sequence[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    group_idx: int | None = None


class BlockRemoved(NamedTuple):
    block_hashes: tuple[int, ...]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(NamedTuple):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(NamedTuple):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None
    unknown: int = 0  # events of a type this decoder does not know (skipped)


_ARRAY_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name"),
    "BlockRemoved": ("block_hashes", "medium"),
}


def _hash(value: Any) -> int:
    """A block hash as an unsigned 64-bit int (ints of either sign; bytes: the last 8, big-endian)."""
    if isinstance(value, bytes):
        return int.from_bytes(value[-8:], "big")
    if isinstance(value, int):
        return value & _U64
    raise ValueError(f"a block hash must be an int or bytes, got {type(value).__name__}")


def _event(raw: Any) -> Event | None:
    if isinstance(raw, dict):
        tag = raw.get("type")
        get = raw.get
    elif isinstance(raw, list | tuple) and raw:
        tag = raw[0]
        get = dict(zip(_ARRAY_FIELDS.get(tag, ()), raw[1:], strict=False)).get
    else:
        raise ValueError("an event must be a map or a non-empty array")
    if tag == "BlockStored":
        parent = get("parent_block_hash")
        tokens = get("token_ids") or ()
        if not isinstance(tokens, list | tuple):
            raise ValueError("token_ids must be an array")
        return BlockStored(
            tuple(_hash(h) for h in get("block_hashes") or ()),
            _hash(parent) or None if parent is not None else None,  # 0: no parent (llm-d's encoders)
            tokens,
            int(get("block_size") or 0),
            get("lora_id"),
            get("medium"),
            get("lora_name"),
            get("group_idx"),
        )
    if tag == "BlockRemoved":
        return BlockRemoved(tuple(_hash(h) for h in get("block_hashes") or ()), get("medium"), get("group_idx"))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


def decode_batch(payload: bytes) -> EventBatch:
    """One message's msgpack payload; ``ValueError`` when it is not an ``EventBatch``."""
    try:
        batch = msgpack.unpackb(payload, use_list=True, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError(f"not msgpack: {exc}") from None
    if not isinstance(batch, list | tuple) or len(batch) < 2 or not isinstance(batch[1], list | tuple):
        raise ValueError("an EventBatch is an array [ts, events, data_parallel_rank]")
    events: list[Event] = []
    unknown = 0
    try:
        for raw in batch[1]:
            ev = _event(raw)
            if ev is None:
                unknown += 1
            else:
                events.append(ev)
        ts = float(batch[0])
    except (TypeError, KeyError) as exc:
        raise ValueError(f"malformed event: {exc}") from None
    rank = batch[2] if len(batch) > 2 and isinstance(batch[2], int) else None
    return EventBatch(ts, events, rank, unknown)


class KeyChain(Protocol):
    """The block-key scheme (``epp.scheduling.blockkeys.BlockKeys`` satisfies it)."""

    def root(self, model: str) -> int: ...
    def chain(self, parent: int, token_ids: Sequence[int], block_size: int) -> list[int]: ...


@dataclass
class KVEventStats:
    """Counts since the index was made (all pods)."""

    messages: int = 0
    events: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    cleared: int = 0
    gaps: int = 0  # sequence gaps or restarts (entries dropped, rebuilt from new events)
    resets: int = 0  # every drop of a pod's entries: gaps, AllBlocksCleared, disconnects, bad payloads
    orphans: int = 0  # stored blocks whose parent was never seen (cannot be keyed)
    overflow: int = 0  # entries dropped by the per-pod bound
    decode_errors: int = 0
    skipped: int = 0  # events for another tier or KV-cache group, of an unknown type, or inconsistent
    speculated: int = 0  # picks entered as speculative entries (own and peers')
    apply_seconds: float = 0.0  # time spent decoding and applying messages
    by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def seconds_per_event(self) -> float:
        return self.apply_seconds / self.events if self.events else 0.0


class _Pod:
    __slots__ = ("block_size", "blocks", "keys", "messages", "model", "seq", "spec")

    def __init__(self) -> None:
        self.blocks: OrderedDict[int, int] = OrderedDict()  # engine hash → key, oldest first
        self.keys: dict[int, int] = {}  # key → engine blocks holding it
        self.spec: OrderedDict[int, float] = OrderedDict()  # speculative key → expiry, soonest first
        self.seq: int | None = None
        self.block_size: int | None = None
        self.model = ""
        self.messages = 0

    def clear(self) -> None:
        self.blocks.clear()
        self.keys.clear()
        self.spec.clear()


def _topic_model(topic: bytes) -> str:
    """``kv@<pod>@<model>`` → ``<model>`` ("" for other topics)."""
    parts = topic.decode("utf-8", "replace").split("@", 2)
    return parts[2] if len(parts) == 3 and parts[0] == "kv" else ""


class KVEventIndex:
    """Per pod (by address): the block keys its KV events say it holds (module docstring)."""

    def __init__(
        self,
        keys: KeyChain,
        *,
        default_model: str = "",
        capacity_of: Callable[[str], int | None] = lambda address: None,
        default_capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.perf_counter,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._chain = keys
        self._now = now  # speculative entries' expiry (a virtual clock in simulations)
        self.on_speculate: Callable[[str, int, Sequence[int], float], None] | None = None
        self._default_model = default_model
        self._capacity_of = capacity_of
        self._default_capacity = default_capacity
        self._clock = clock
        self._pods: dict[str, _Pod] = {}
        self.stats = KVEventStats()

    # ---- what the scorer reads (epp.scheduling.blockkeys.BlockLookup) ---------------------------
    def block_size(self, address: str) -> int | None:
        """The pod's block size; None while it has published nothing (the scorer falls back)."""
        pod = self._pods.get(address)
        return pod.block_size if pod is not None else None

    def leading_run(self, address: str, keys: Sequence[int]) -> int:
        """How many of ``keys``, from the first, the pod holds without a gap."""
        pod = self._pods.get(address)
        if pod is None:
            return 0
        held = pod.keys
        n = 0
        for k in keys:
            if k not in held:
                break
            n += 1
        spec = pod.spec
        if spec and n < len(keys):
            now = self._now()
            for k in keys[n:]:
                if k not in held and spec.get(k, 0.0) <= now:
                    break
                n += 1
        return n

    def speculate(self, address: str, keys: Sequence[int], ttl: float, *, share: bool = True) -> bool:
        """The pod was just sent a prompt with these block ``keys`` (at the pod's block size):
        count them as held for ``ttl`` seconds, until its own events tell.  False when the pod
        has published nothing yet (its block size is unknown).  ``share``: tell ``on_speculate``
        (False for entries that came from a peer)."""
        pod = self._pods.get(address)
        if pod is None or pod.block_size is None or not keys or ttl <= 0:
            return False
        now = self._now()
        spec = pod.spec
        while spec:  # expired entries leave from the front (entries of one TTL expire in order)
            k, expiry = next(iter(spec.items()))
            if expiry > now:
                break
            del spec[k]
        expiry = now + ttl
        for k in keys:
            if k in spec:
                spec.move_to_end(k)
            spec[k] = expiry
        cap = self._capacity_of(address) or self._default_capacity
        if len(spec) > cap:  # entries of other TTLs (a peer's) may hide expired ones: sweep them all first
            for k in [k for k, e in spec.items() if e <= now]:
                del spec[k]
        while len(spec) > cap:
            spec.popitem(last=False)
        self.stats.speculated += 1
        if share and self.on_speculate is not None:
            self.on_speculate(address, pod.block_size, keys, ttl)
        return True

    def speculative(self, address: str) -> int:
        """Speculative entries held for the pod (expired ones included until pruned)."""
        pod = self._pods.get(address)
        return len(pod.spec) if pod is not None else 0

    # ---- introspection -------------------------------------------------------------------------
    def __len__(self) -> int:
        """Entries over all pods."""
        return sum(len(p.blocks) for p in self._pods.values())

    def addresses(self) -> list[str]:
        return list(self._pods)

    def num_blocks(self, address: str) -> int:
        pod = self._pods.get(address)
        return len(pod.blocks) if pod is not None else 0

    def last_seq(self, address: str) -> int | None:
        pod = self._pods.get(address)
        return pod.seq if pod is not None else None

    def messages(self, address: str) -> int:
        """Messages applied for the pod since it was first seen (or forgotten)."""
        pod = self._pods.get(address)
        return pod.messages if pod is not None else 0

    # ---- membership ------------------------------------------------------------------------------
    def forget(self, address: str) -> None:
        """The pod left the pool: drop everything about it."""
        self._pods.pop(address, None)

    def retain(self, addresses: Iterable[str]) -> None:
        """Keep only these pods."""
        keep = set(addresses)
        for a in [a for a in self._pods if a not in keep]:
            del self._pods[a]

    def reset(self, address: str, reason: str) -> None:
        """Drop the pod's entries (its state is unknown now); the next message starts it afresh."""
        pod = self._pods.get(address)
        if pod is None:
            return
        pod.clear()
        pod.seq = None
        self._count_reset(reason)

    def _count_reset(self, reason: str) -> None:
        self.stats.resets += 1
        self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1

    # ---- applying events ---------------------------------------------------------------------------
    def apply(self, address: str, frames: Sequence[bytes]) -> None:
        """One ZMQ message (topic, sequence number, payload) from the pod at ``address``."""
        t0 = self._clock()
        stats = self.stats
        stats.messages += 1
        pod = self._pods.get(address)
        if pod is None:
            pod = self._pods[address] = _Pod()
        pod.messages += 1
        if len(frames) != 3 or len(frames[1]) != 8:
            stats.decode_errors += 1
            self.reset(address, "malformed")
            stats.apply_seconds += self._clock() - t0
            return
        seq = _SEQ.unpack(frames[1])[0]
        if pod.seq is not None and seq != pod.seq + 1:
            stats.gaps += 1
            pod.clear()
            self._count_reset("gap" if seq > pod.seq else "restart")
        pod.seq = seq
        try:
            batch = decode_batch(frames[2])
            pod.model = _topic_model(frames[0]) or self._default_model
            stats.skipped += batch.unknown
            for ev in batch.events:
                self._apply_event(address, pod, ev)
        except (ValueError, struct.error, OverflowError, TypeError) as exc:  # also token ids out of uint32 range
            log.debug("bad KV event payload from %s: %s", address, exc)
            stats.decode_errors += 1
            self.reset(address, "malformed")
            pod.seq = seq
            stats.apply_seconds += self._clock() - t0
            return
        stats.events += len(batch.events)
        stats.apply_seconds += self._clock() - t0

    def _apply_event(self, address: str, pod: _Pod, ev: Event) -> None:
        stats = self.stats
        if isinstance(ev, AllBlocksCleared):
            pod.clear()
            stats.cleared += 1
            self._count_reset("cleared")
            return
        if ev.medium not in (None, "GPU") or ev.group_idx not in (None, 0):
            stats.skipped += 1
            return
        if isinstance(ev, BlockRemoved):
            blocks, keys = pod.blocks, pod.keys
            for h in ev.block_hashes:
                key = blocks.pop(h, None)
                if key is None:
                    continue
                stats.blocks_removed += 1
                left = keys[key] - 1
                if left:
                    keys[key] = left
                else:
                    del keys[key]
            return
        self._stored(address, pod, ev)

    def _stored(self, address: str, pod: _Pod, ev: BlockStored) -> None:
        stats = self.stats
        n = len(ev.block_hashes)
        bs = ev.block_size or pod.block_size or 0
        if n == 0 or bs <= 0 or len(ev.token_ids) != n * bs:
            stats.skipped += 1
            return
        pod.block_size = bs
        blocks = pod.blocks
        if ev.parent_block_hash is None:
            model = ev.lora_name or (f"lora-id:{ev.lora_id}" if ev.lora_id is not None else pod.model)
            parent = self._chain.root(model)
        else:
            known = blocks.get(ev.parent_block_hash)
            if known is None:
                stats.orphans += n
                return
            parent = known
        keys = pod.keys
        for h, key in zip(ev.block_hashes, self._chain.chain(parent, ev.token_ids, bs), strict=True):
            if h in blocks:  # stored again: refresh its age
                blocks.move_to_end(h)
                continue
            blocks[h] = key
            keys[key] = keys.get(key, 0) + 1
        stats.blocks_stored += n
        cap = self._capacity_of(address) or self._default_capacity
        while len(blocks) > cap:
            _, old = blocks.popitem(last=False)
            left = keys[old] - 1
            if left:
                keys[old] = left
            else:
                del keys[old]
            stats.overflow += 1


def port_endpoint(port: int) -> Callable[[Endpoint], str]:
    """The pod's publisher at ``tcp://<pod ip>:<port>`` (vLLM binds ``tcp://*:<port>``)."""

    def endpoint_of(e: Endpoint) -> str:
        ip = e.ip
        return f"tcp://[{ip}]:{port}" if ":" in ip else f"tcp://{ip}:{port}"

    return endpoint_of


def topic_prefix(template: str = "kv@{address}@") -> Callable[[Endpoint], str]:
    """The subscription (a topic prefix) for a pod: ``{address}`` (ip:port), ``{ip}``, ``{name}``;
    the default, ``kv@{address}@``, is llm-d's ``kv@<pod>@<model>`` for any model.  ``""``
    subscribes to every topic (vLLM's default topic is empty)."""

    def topic_of(e: Endpoint) -> str:
        return template.format(address=e.address, ip=e.ip, name=e.name)

    return topic_of


class CountWaiters:
    """Futures that wait until a count (per key) reaches a number: tests await them instead of
    sleeping.  ``wake(key, count)`` after the count moved; ``cancel()`` when closing."""

    def __init__(self) -> None:
        self._waiting: list[tuple[object, int, asyncio.Future[None]]] = []

    def __bool__(self) -> bool:
        return bool(self._waiting)

    async def wait(self, key: object, n: int, count: int) -> None:
        """Return once ``wake(key, c)`` has been called with ``c >= n`` (at once if ``count >= n``)."""
        if count >= n:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((key, n, fut))
        await fut

    def wake(self, key: object, count: int) -> None:
        keep = []
        for w in self._waiting:
            if w[0] == key and w[1] <= count:
                if not w[2].done():
                    w[2].set_result(None)
            else:
                keep.append(w)
        self._waiting = keep

    def cancel(self) -> None:
        for _, _, fut in self._waiting:
            if not fut.done():
                fut.cancel()
        self._waiting.clear()


class _Sub:
    __slots__ = ("address", "endpoint", "monitor", "sock", "tasks", "topic")

    def __init__(self, address: str, endpoint: str, topic: str, sock: zmq.asyncio.Socket,
                 monitor: zmq.asyncio.Socket) -> None:  # fmt: skip
        self.address = address
        self.endpoint = endpoint
        self.topic = topic
        self.sock = sock
        self.monitor = monitor
        self.tasks: list[asyncio.Task[None]] = []


class KVEventSubscriber:
    """One ZMQ SUB socket per pod, feeding a :class:`KVEventIndex`.

    ``endpoint_of(endpoint)`` names the pod's publisher (None: this pod publishes nothing);
    ``topic_of(endpoint)`` the subscription prefix.  :meth:`follow` opens and closes sockets
    as pods come and go (a pod that leaves is also forgotten by the index); :meth:`run`
    reads them all until cancelled.  A reader that fails makes :meth:`run` raise, so the
    supervisor restarts it.  ``await received(address, n)`` returns once ``n`` messages
    of that pod were applied (tests wait on it instead of sleeping).
    """

    def __init__(
        self,
        index: KVEventIndex,
        endpoint_of: Callable[[Endpoint], str | None],
        *,
        topic_of: Callable[[Endpoint], str] | None = None,
        context: zmq.asyncio.Context | None = None,
        rcvhwm: int = 100_000,
    ) -> None:
        self.index = index
        self._endpoint_of = endpoint_of
        self._topic_of = topic_of or topic_prefix()
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._rcvhwm = rcvhwm
        self._subs: dict[str, _Sub] = {}
        self._group: asyncio.TaskGroup | None = None
        self._waiters = CountWaiters()
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        """Pods with a socket."""
        return list(self._subs)

    def endpoint(self, address: str) -> str | None:
        sub = self._subs.get(address)
        return sub.endpoint if sub is not None else None

    def follow(self, endpoints: Iterable[Endpoint]) -> None:
        """Subscribe to exactly these pods (call it on every pool change; a no-op when none)."""
        if self._closed:
            return
        wanted: dict[str, tuple[str, str]] = {}
        for e in endpoints:
            where = self._endpoint_of(e)
            if where is not None:
                wanted[e.address] = (where, self._topic_of(e))
        for address in [a for a, s in self._subs.items() if (s.endpoint, s.topic) != wanted.get(a)]:
            self._close(self._subs.pop(address))
            self.index.forget(address)
        for address, (where, topic) in wanted.items():
            if address not in self._subs:
                self._open(address, where, topic)

    def _open(self, address: str, where: str, topic: str) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            sock.connect(where)
        except zmq.ZMQError as exc:
            log.warning("cannot subscribe to KV events of %s at %s: %s", address, where, exc)
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            return
        sub = self._subs[address] = _Sub(address, where, topic, sock, monitor)
        if self._group is not None:
            self._start(sub, self._group)

    def _start(self, sub: _Sub, group: asyncio.TaskGroup) -> None:
        sub.tasks = [
            group.create_task(self._read(sub), name=f"kv-events {sub.address}"),
            group.create_task(self._watch(sub), name=f"kv-events monitor {sub.address}"),
        ]

    def _close(self, sub: _Sub) -> None:
        for t in sub.tasks:
            t.cancel()
        with contextlib.suppress(zmq.ZMQError):
            sub.sock.disable_monitor()
        sub.monitor.close(linger=0)
        sub.sock.close(linger=0)

    async def run(self) -> None:
        """Read every pod's socket until cancelled (run it as a supervised task)."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for sub in self._subs.values():
                    self._start(sub, group)
                await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._group = None

    async def _read(self, sub: _Sub) -> None:
        sock, address, apply = sub.sock, sub.address, self.index.apply
        # Messages already queued are drained without a future each, through a synchronous view
        # of the same socket (non-blocking reads only); the awaited read then waits for the next
        # one (it tries a non-blocking read first, so none is missed).  At most _YIELD_EVERY per
        # turn, then the loop gets to run other work.
        drain: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        while True:
            apply(address, await sock.recv_multipart())
            for _ in range(_YIELD_EVERY):
                try:
                    msg = drain.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                apply(address, msg)
            else:
                await asyncio.sleep(0)
            if self._waiters:
                self._waiters.wake(address, self.index.messages(address))

    async def _watch(self, sub: _Sub) -> None:
        while True:
            event = parse_monitor_message(await sub.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.index.reset(sub.address, "disconnect")

    async def received(self, address: str, n: int) -> None:
        """Return once ``n`` messages from ``address`` have been applied (counted since it was first seen)."""
        await self._waiters.wait(address, n, self.index.messages(address))

    def close(self) -> None:
        """Close every socket (idempotent); cancel :meth:`run` separately (the supervisor does)."""
        if self._closed:
            return
        self._closed = True
        for sub in self._subs.values():
            self._close(sub)
        self._subs.clear()
        self._waiters.cancel()
        if self._own_context:
            self._ctx.destroy(linger=0)
