"""vLLM KV-cache events: what a simulated pod publishes, in vLLM's wire format.

Owns the event values (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`), their msgpack
encoding, the `EventLog` a pod's `KVCache` writes into, and `KVEventPublisher`, the ZMQ side.

Wire format (vLLM `vllm/distributed/kv_events.py`, reference/model-servers.md §5):

- one ZMQ message of three frames: topic (bytes), sequence number (8 bytes, big-endian,
  +1 per message, from 0 when the process starts), msgpack payload;
- the payload is an `EventBatch` encoded as an array `[ts, events, data_parallel_rank]`;
- an event is a map tagged by `"type"` (vLLM since PR #42892, the default here, `form="map"`)
  or, in older releases, a positional array with the tag first (`form="array"`):
  `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]`,
  `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`;
- block hashes are 64-bit unsigned ints (vLLM's `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`):
  the simulator's own chained xxh3 hashes (`tokenizer.py`), full blocks only, each
  `BlockStored` naming the parent of its first block (`None` for a prompt's first block).

The pod's prefix cache is the source of truth: `KVCache` reports each block it registers
(`BlockStored`, with the block's token ids) and each cached block it evicts (`BlockRemoved`);
`KVCache.clear()` reports `AllBlocksCleared`.  Events are published once per engine step, as
vLLM does, in one batch.

The publisher binds an XPUB socket (wire-compatible with PUB, so any SUB connects), which
also tells the pod when a subscriber's subscription has arrived: `await
publisher.subscribed(n)` replaces sleeping for ZMQ's slow-joiner window in tests.

Invariants: sequence numbers are consecutive per publisher; a batch is never empty; the
encoding round-trips through `decode_batch` in both forms.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]
import zmq
import zmq.asyncio

__all__ = [
    "FORMATS",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventLog",
    "KVEvent",
    "KVEventPublisher",
    "decode_batch",
    "encode_batch",
    "frames",
]

FORMATS = ("map", "array")
_SEQ = struct.Struct(">Q")
_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks entered the prefix-cache table (hashes chained from `parent_block_hash`)."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Cached blocks were evicted."""

    block_hashes: tuple[int, ...]
    medium: str | None = "GPU"


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def _encode_event(event: KVEvent, form: str) -> Any:
    if isinstance(event, BlockStored):
        if form == "array":
            return ["BlockStored", list(event.block_hashes), event.parent_block_hash, list(event.token_ids),
                    event.block_size, event.lora_id, event.medium, event.lora_name]  # fmt: skip
        return {
            "type": "BlockStored",
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": event.medium,
            "lora_name": event.lora_name,
        }
    if isinstance(event, BlockRemoved):
        if form == "array":
            return ["BlockRemoved", list(event.block_hashes), event.medium]
        return {"type": "BlockRemoved", "block_hashes": list(event.block_hashes), "medium": event.medium}
    return ["AllBlocksCleared"] if form == "array" else {"type": "AllBlocksCleared"}


def encode_batch(ts: float, events: Sequence[KVEvent], data_parallel_rank: int = 0, form: str = "map") -> bytes:
    """The msgpack payload of one `EventBatch`."""
    if form not in FORMATS:
        raise ValueError(f"unknown KV event form {form!r} (choose from {', '.join(FORMATS)})")
    payload: bytes = msgpack.packb([ts, [_encode_event(e, form) for e in events], data_parallel_rank])
    return payload


def _hash(value: Any) -> int:
    if isinstance(value, bytes):
        return int.from_bytes(value[-8:], "big")
    return int(value) & _U64


def _decode_event(raw: Any) -> KVEvent:
    if isinstance(raw, dict):
        tag = raw.get("type")
        get = raw.get
    else:
        tag = raw[0]
        names = {"BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                                 "medium", "lora_name"),
                 "BlockRemoved": ("block_hashes", "medium")}.get(tag, ())  # fmt: skip
        fields = dict(zip(names, raw[1:], strict=False))
        get = fields.get
    if tag == "BlockStored":
        parent = get("parent_block_hash")
        return BlockStored(
            tuple(_hash(h) for h in get("block_hashes") or ()),
            None if parent is None else _hash(parent),
            tuple(get("token_ids") or ()),
            int(get("block_size") or 0),
            get("lora_id"),
            get("medium"),
            get("lora_name"),
        )
    if tag == "BlockRemoved":
        return BlockRemoved(tuple(_hash(h) for h in get("block_hashes") or ()), get("medium"))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown KV event type {tag!r}")


def decode_batch(payload: bytes) -> tuple[float, list[KVEvent], int | None]:
    """`(ts, events, data_parallel_rank)` of a payload in either form (for tests and tools)."""
    batch = msgpack.unpackb(payload)
    rank = batch[2] if len(batch) > 2 else None
    return float(batch[0]), [_decode_event(e) for e in batch[1]], rank


def frames(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    """The three frames of one message."""
    return [topic, _SEQ.pack(seq), payload]


@dataclass(slots=True)
class EventLog:
    """Where a `KVCache` writes its events; the pod drains it once per step."""

    events: list[KVEvent] = field(default_factory=list)

    def stored(
        self, hashes: Sequence[int], parent: int | None, token_ids: Sequence[int], block_size: int, lora: str | None
    ) -> None:
        self.events.append(BlockStored(tuple(hashes), parent, tuple(token_ids), block_size, None, "GPU", lora))

    def removed(self, hashes: Sequence[int]) -> None:
        self.events.append(BlockRemoved(tuple(hashes)))

    def cleared(self) -> None:
        self.events.append(AllBlocksCleared())

    def drain(self) -> list[KVEvent]:
        out, self.events = self.events, []
        return out


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class KVEventPublisher:
    """One pod's ZMQ publisher: an XPUB socket bound at `endpoint`, topic and sequence numbers."""

    def __init__(self, endpoint: str, topic: str, *, form: str = "map", data_parallel_rank: int = 0) -> None:
        if form not in FORMATS:
            raise ValueError(f"unknown KV event form {form!r} (choose from {', '.join(FORMATS)})")
        self.topic = topic
        self.form = form
        self.data_parallel_rank = data_parallel_rank
        self.seq = 0
        self.subscriptions = 0
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)  # vLLM's default hwm
        self._sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscription, also repeated ones
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError:
            self._sock.close()
            self._ctx.term()
            raise
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start reading subscriptions (for `subscribed`)."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_subscriptions(), name="kv-events-xpub")

    async def _read_subscriptions(self) -> None:
        while True:
            msg = await self._sock.recv()
            if msg[:1] == b"\x01":
                self.subscriptions += 1
                ready = [w for w in self._waiters if w[0] <= self.subscriptions]
                self._waiters = [w for w in self._waiters if w[0] > self.subscriptions]
                for _, fut in ready:
                    if not fut.done():
                        fut.set_result(None)

    async def subscribed(self, n: int = 1) -> None:
        """Return once `n` subscriptions have reached this publisher (messages sent after it are delivered)."""
        if self.subscriptions >= n:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        await fut

    def publish(self, events: Sequence[KVEvent], ts: float | None = None) -> int | None:
        """Send one batch (nothing when `events` is empty); returns its sequence number."""
        if not events or self._closed:
            return None
        payload = encode_batch(time.time() if ts is None else ts, events, self.data_parallel_rank, self.form)
        seq = self.seq
        self.seq += 1
        # An XPUB send never blocks (over the high-water mark the message is dropped, as vLLM's
        # PUB drops it), so the future is done at once; the callback only consumes its outcome.
        sent = asyncio.ensure_future(self._sock.send_multipart(frames(self.topic.encode(), seq, payload)))
        sent.add_done_callback(_consume)
        return seq

    async def aclose(self) -> None:
        """Close the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._sock.close(linger=0)
        self._ctx.term()
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
