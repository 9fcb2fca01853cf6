"""The supervisor: a background task that raises is logged, counted and restarted; none dies unseen."""

from __future__ import annotations

import asyncio
import logging

import pytest

from epp.supervisor import Supervisor


async def test_a_failing_task_is_logged_counted_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    failures: list[str] = []
    runs = 0
    third = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"boom {runs}")
        third.set()
        await asyncio.Event().wait()  # the third run stays up

    sup = Supervisor(on_failure=failures.append, backoff=0.001, max_backoff=0.002)
    with caplog.at_level(logging.ERROR, logger="epp.supervisor"):
        task = sup.spawn("scrape 127.0.0.1:1", flaky)
        await asyncio.wait_for(third.wait(), 5)
    assert failures == ["scrape 127.0.0.1:1"] * 2 and task.failures == 2 and not task.done
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 2 and all(r.exc_info and "boom" in str(r.exc_info[1]) for r in logged)
    await sup.aclose()
    assert task.done and sup.tasks == frozenset()


async def test_a_task_that_returns_is_not_restarted() -> None:
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    sup = Supervisor(backoff=0.001)
    task = sup.spawn("once", once)
    await asyncio.wait_for(task._task, 5)
    assert runs == 1 and task.done and task.failures == 0
    await sup.aclose()


async def test_close_cancels_every_task_and_waits_for_it() -> None:
    started, cleaned = asyncio.Event(), []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    sup = Supervisor()
    sup.spawn("a", forever)
    await asyncio.wait_for(started.wait(), 5)
    await sup.aclose()
    assert cleaned == [True]
    await sup.aclose()  # idempotent


async def test_app_counts_background_failures_in_metrics(write_pool, start_app) -> None:
    app = await start_app(write_pool(["127.0.0.1:9"]), refresh_metrics_interval=0)
    done = asyncio.Event()

    async def broken() -> None:
        done.set()
        raise ValueError("bug")

    app.supervisor.backoff = 60.0  # fail once, then wait
    app.supervisor.spawn("discovery", broken)
    await asyncio.wait_for(done.wait(), 5)  # the raise and its handling ran in the same step as set()
    value = app.metrics.registry.get_sample_value("epp_background_task_failures_total", {"task": "discovery"})
    assert value == 1.0


async def test_a_task_cancelled_without_waiting_is_still_awaited_at_close() -> None:
    started, cleaned = asyncio.Event(), asyncio.Event()

    async def slow_to_stop() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that needs one more loop turn
            cleaned.set()

    sup = Supervisor()
    task = sup.spawn("scrape x", slow_to_stop)
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()  # what ScrapeLoops does when an endpoint leaves
    await sup.aclose()
    assert cleaned.is_set() and task.done and sup.tasks == frozenset()


async def test_the_backoff_starts_again_after_a_healthy_run(caplog: pytest.LogCaptureFixture) -> None:
    """Quick failures back off 0.001, 0.002, 0.004 s; a run that stayed up longer than the
    longest backoff before failing is restarted after the shortest again."""
    runs = 0
    done = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 4:
            await asyncio.sleep(0.02)  # this run is healthy for longer than max_backoff, then fails
        if runs == 5:
            done.set()
            await asyncio.Event().wait()
        raise RuntimeError(f"boom {runs}")

    sup = Supervisor(backoff=0.001, max_backoff=0.008)
    with caplog.at_level(logging.ERROR, logger="epp.supervisor"):
        sup.spawn("flaky", flaky)
        await asyncio.wait_for(done.wait(), 5)
    delays = [r.args[2] for r in caplog.records if r.levelno == logging.ERROR]
    assert delays == [0.001, 0.002, 0.004, 0.001]
    await sup.aclose()
