"""Real-time driver: runs an `Engine` in wall-clock time on the asyncio event loop.

Owns the one background task per pod that sleeps until the engine's next step ends, applies
it, and wakes the HTTP handlers waiting for tokens.

Timing: step boundaries follow the engine's schedule, not the moment the task happens to
wake (the sleep may overshoot by a millisecond or so but never undershoot). Steps therefore
chain back to back exactly as in virtual time, and recorded latencies match the virtual-time
model; only when the loop falls more than `max_lag` behind does the engine re-anchor to the
present.

Gauges follow vLLM: they are refreshed after each step (and after aborts), so a request
that is admitted by the very next step is never seen waiting.

Invariants: `start()` once, `aclose()` idempotent and waits for the task to exit; after
`aclose()` every unfinished request is finished with reason `abort` and its waiter woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from epp_sim.domain import SimRequest
from epp_sim.engine import Engine, StepOutput

__all__ = ["EngineRunner", "Ticket"]

logger = logging.getLogger(__name__)


class Ticket:
    """Submitted requests (one per prompt) plus an awaitable that fires on their progress."""

    __slots__ = ("_event", "reqs")

    def __init__(self, reqs: Sequence[SimRequest]) -> None:
        self.reqs = tuple(reqs)
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        """Wait until a request produced tokens or finished since the last wait."""
        await self._event.wait()
        self._event.clear()


class EngineRunner:
    """Owns the asyncio task that steps one engine in real time."""

    def __init__(
        self,
        engine: Engine,
        on_step: Callable[[StepOutput], None] | None = None,
        on_change: Callable[[], None] | None = None,
        max_lag: float = 0.025,
    ) -> None:
        self.engine = engine
        self._on_step = on_step
        self._on_change = on_change
        self._max_lag = max_lag
        self._tickets: dict[int, tuple[SimRequest, Ticket]] = {}
        self._wake = asyncio.Event()
        self._running = asyncio.Event()
        self._running.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @staticmethod
    def clock() -> float:
        """The engine's clock, in seconds: `time.monotonic()`.

        Not `loop.time()`: under uvloop that has millisecond resolution.
        """
        return time.monotonic()

    def start(self) -> None:
        """Start the stepping task."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="epp-sim-engine")
            self._task.add_done_callback(self._on_exit)

    def _on_exit(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug in the engine: say so loudly and release every waiting handler.
        logger.error("engine task crashed", exc_info=task.exception())
        self._closed = True
        now = self.clock()
        for req, ticket in list(self._tickets.values()):
            self.engine.abort(req, now)
            ticket.notify()
        self._tickets.clear()

    async def aclose(self) -> None:
        """Stop stepping and abort every unfinished request."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        now = self.clock()
        for req, ticket in list(self._tickets.values()):
            self.engine.abort(req, now)
            ticket.notify()
        self._tickets.clear()

    def submit(self, reqs: Sequence[SimRequest]) -> Ticket:
        """Queue `reqs` now, all or none (raises `RequestTooLarge`); the ticket wakes on progress."""
        if self._closed:
            raise RuntimeError("engine runner is closed")
        for req in reqs:
            self.engine.validate(req)
        ticket = Ticket(reqs)
        for req in reqs:
            self.engine.add_request(req)
            self._tickets[id(req)] = (req, ticket)
        self._wake.set()
        if not self._running.is_set():
            self._changed()  # paused: show the queue now, since no step will report it
        return ticket

    def abort(self, ticket: Ticket) -> None:
        """Drop the ticket's unfinished requests (e.g. the client went away)."""
        now = self.clock()
        for req in ticket.reqs:
            if self._tickets.pop(id(req), None) is not None and not req.finished:
                self.engine.abort(req, now)
        self._changed()

    def pause(self) -> None:
        """Freeze the engine: no step ends or starts until `resume`; arrivals queue (test hook)."""
        self._running.clear()

    def resume(self) -> None:
        """Undo `pause`."""
        self._running.set()
        self._wake.set()

    def wake(self) -> None:
        """The engine changed outside a step (e.g. `Engine.restart`): look at it again."""
        self._wake.set()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    async def _run(self) -> None:
        engine = self.engine
        while True:
            await self._running.wait()
            self._wake.clear()
            due = engine.next_event_time()
            if due is None:
                await self._wake.wait()
                continue
            delay = due - self.clock()
            if delay > 0:
                # uvloop's millisecond timers can fire early, so check again after waking: a step
                # must never start before its time, or a request arriving in between would miss
                # a step that it gets in virtual time. Sleeping at least 1 ms avoids spinning.
                await asyncio.sleep(max(delay, 0.001))
                continue
            outputs = engine.advance(self.clock(), self._max_lag)
            for out in outputs:
                self._deliver(out)
            self._changed()
            if not outputs and not engine.busy:
                await self._wake.wait()  # nothing could be scheduled: wait for a new request

    def _deliver(self, out: StepOutput) -> None:
        if self._on_step is not None:
            self._on_step(out)
        tickets = self._tickets
        for req in out.emitted:
            entry = tickets.get(id(req))
            if entry is not None:
                entry[1].notify()
        for req in out.finished:
            tickets.pop(id(req), None)
