"""Background tasks under supervision: none can die unseen.

Every long-running loop of epp (scrapers, discovery watches, the pool-file poll) runs as
a :class:`Supervisor` task.  A task that raises is logged with its traceback, counted
(``on_failure``) and restarted after an exponential backoff; one that returns has
finished its work and is not restarted.  Cancellation is the only way to stop a task,
and :meth:`Supervisor.aclose` waits until every task has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

FailureHook = Callable[[str], None]  # the task's name


class SupervisedTask:
    """One supervised loop; :meth:`stop` cancels it and waits for it to exit."""

    def __init__(self, supervisor: Supervisor, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.failures = 0
        self._supervisor = supervisor
        self._run = run
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=name)
        self._task.add_done_callback(lambda _: supervisor._tasks.discard(self))

    async def _loop(self) -> None:
        delay = self._supervisor.backoff
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._run()
                return
            except Exception:
                if loop.time() - started > self._supervisor.max_backoff:  # it had been healthy: start again
                    delay = self._supervisor.backoff
                self.failures += 1
                log.exception(
                    "background task %s failed (%d failures); restarting in %.2fs", self.name, self.failures, delay
                )
                self._supervisor._failed(self.name)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._supervisor.max_backoff)

    @property
    def done(self) -> bool:
        return self._task.done()

    def cancel(self) -> None:
        """Ask the task to stop, without waiting (for synchronous callers; ``Supervisor.aclose`` still waits)."""
        self._task.cancel()

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Supervisor:
    """Owns every background task of one epp process."""

    def __init__(
        self, *, on_failure: FailureHook | None = None, backoff: float = 0.1, max_backoff: float = 10.0
    ) -> None:
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._on_failure = on_failure
        self._tasks: set[SupervisedTask] = set()

    def spawn(self, name: str, run: Callable[[], Awaitable[None]]) -> SupervisedTask:
        """Run ``run()`` in the background; restart it whenever it raises."""
        task = SupervisedTask(self, name, run)
        self._tasks.add(task)
        return task

    @property
    def tasks(self) -> frozenset[SupervisedTask]:
        return frozenset(self._tasks)

    def _failed(self, name: str) -> None:
        if self._on_failure is not None:
            self._on_failure(name)

    async def aclose(self) -> None:
        """Cancel every task and wait for all of them to exit (idempotent)."""
        for t in list(self._tasks):
            await t.stop()
