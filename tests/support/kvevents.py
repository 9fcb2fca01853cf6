"""KV-event collectors run as tasks for a test's length."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from epp.datalayer.kvcollect import KVEventCollector


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
