"""KV events in tests: collectors run as tasks for a test's length, and an index told that a pod holds
the first blocks of ``PROMPT`` (as epp-sim would publish them)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable

import msgpack

from epp.datalayer.kvcollect import KVEventCollector
from epp.datalayer.kvevents import KVEventIndex
from epp.scheduling.blockkeys import Utf8QuadTokenizer


@contextlib.asynccontextmanager
async def running_collectors() -> AsyncIterator[Callable[[KVEventCollector], KVEventCollector]]:
    """``run(collector)`` starts ``collector.run()`` as a task; on exit each is cancelled (and must
    end cancelled), then closed."""
    tasks: list[tuple[asyncio.Task[None], KVEventCollector]] = []

    def run(c: KVEventCollector) -> KVEventCollector:
        tasks.append((asyncio.create_task(c.run()), c))
        return c

    yield run
    for task, c in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled(), "a collector's run() ended before it was cancelled"
        c.close()


PROMPT = "".join(f"[block {i:02d} of the system prompt]".ljust(64, ".") for i in range(8))  # 8 blocks of 16 tokens


def publish(idx: KVEventIndex, address: str, blocks: int, seq: int = 0, model: str = "base") -> None:
    """The pod reports holding the first ``blocks`` blocks of PROMPT (as epp-sim would publish them)."""
    ids = list(Utf8QuadTokenizer().token_ids(PROMPT[: blocks * 64]))
    event = {"type": "BlockStored", "block_hashes": list(range(1, blocks + 1)), "parent_block_hash": None,
             "token_ids": ids, "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None}  # fmt: skip
    idx.apply(address, [f"kv@{address}@{model}".encode(), struct.pack(">Q", seq), msgpack.packb([0.0, [event], 0])])
