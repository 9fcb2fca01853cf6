"""How late the event loop runs a timer: a probe task wakes every ``period`` seconds and
records how far past its deadline it woke.  The worst of those is the longest time the
loop was busy with something else (a blocking call, a long callback, the GIL held by
another thread), which is what would stall every ext_proc stream.  The probe's sleep
measures; it synchronises nothing.

On a shared machine the OS also takes the CPU away from the loop's thread now and then
(other processes want the same cores); that is no fault of the code under test.  Linux
counts it per thread (``/proc/thread-self/schedstat``: time spent runnable but waiting
for a CPU), so besides the wall-clock lag (``max``) the probe reports ``max_own``: each
wake-up's lag minus the time its thread sat in the run queue meanwhile.  A blocking call
or a long callback shows up in both; a busy neighbour only in ``max``.

    async with LoopLag() as lag:
        ...  # the work under test
    assert lag.max_own < 0.1, str(lag)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from types import TracebackType

_SCHEDSTAT = Path("/proc/thread-self/schedstat")


def _runqueue_wait() -> float:
    """Seconds this thread has spent runnable but not running (0 where Linux does not say)."""
    try:
        return int(_SCHEDSTAT.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class LoopLag:
    """The event loop's lag while the ``async with`` block runs: worst, worst not caused by
    CPU contention, and mean."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.max = 0.0
        self.max_own = 0.0
        self.samples = 0
        self._total = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def mean(self) -> float:
        return self._total / self.samples if self.samples else 0.0

    async def _probe(self) -> None:
        while True:
            due = time.monotonic() + self.period
            waited = _runqueue_wait()
            await asyncio.sleep(self.period)
            late = max(0.0, time.monotonic() - due)
            own = max(0.0, late - (_runqueue_wait() - waited))
            self.max = max(self.max, late)
            self.max_own = max(self.max_own, own)
            self._total += late
            self.samples += 1

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._probe())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def __str__(self) -> str:
        return (
            f"max {self.max * 1000:.1f} ms (not CPU contention: {self.max_own * 1000:.1f} ms), "
            f"mean {self.mean * 1000:.2f} ms over {self.samples} wake-ups"
        )
