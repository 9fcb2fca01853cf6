"""The scraper against real HTTP servers on 127.0.0.1: good, failing, garbage, huge and slow pods."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from epp.datalayer import Datastore
from epp.datalayer.engines import ENGINES
from epp.datalayer.scraper import EndpointScraper, ScrapeLoops
from epp.domain import Endpoint
from epp.supervisor import Supervisor
from epp_sim.vllm_page import vllm_exposition

from support import pool
from support.upstreams import serve_app


@dataclass
class MetricsPod:
    text: str = field(default_factory=vllm_exposition)
    status: int = 200
    stall: asyncio.Event | None = None
    queries: list[list[str]] = field(default_factory=list)
    hit: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(f"127.0.0.1:{self.port}", f"pod-{self.port}")

    async def start(self) -> MetricsPod:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self.runner, self.port = await serve_app(app)
        return self

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(request.query.getall("name[]", []))
        self.hit.set()
        if self.stall is not None:
            await self.stall.wait()
        return web.Response(status=self.status, text=self.text)


@pytest.fixture
async def pods():
    made: list[MetricsPod] = []

    async def make(**kw) -> MetricsPod:
        pod = await MetricsPod(**kw).start()
        made.append(pod)
        return pod

    yield make
    for p in made:
        if p.stall is not None:
            p.stall.set()
        await p.runner.cleanup()


def scraper_for(pod: MetricsPod, store: Datastore, **kw) -> EndpointScraper:
    store.set_pool(pool([*store.endpoints(), pod.endpoint]))
    return EndpointScraper(pod.endpoint, ENGINES["vllm"], store, timeout=kw.pop("timeout", 2.0), **kw)


async def test_scrape_stores_metrics_and_asks_only_for_needed_families(pods):
    pod = await pods()
    now = [100.0]
    store = Datastore(staleness=2.0, clock=lambda: now[0])
    s = scraper_for(pod, store, clock=lambda: now[0])
    assert await s.scrape_once()
    m = store.metrics(pod.endpoint.address)
    assert m is not None and (m.running, m.waiting, m.max_lora, m.updated_at) == (12, 3, 4, 100.0)
    assert set(pod.queries[0]) == set(ENGINES["vllm"].families())
    now[0] = 101.0
    assert store.fresh_metrics(pod.endpoint.address) is m
    now[0] = 102.5
    assert store.fresh_metrics(pod.endpoint.address) is None  # stale


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ({"status": 500}, "http_status"),
        ({"text": "<html>not metrics</html>\n{{{ 1 2 3"}, "parse"),
        ({"text": vllm_exposition()[:200]}, "parse"),  # truncated mid-page
        ({"text": "x" * (5 << 20)}, "too_large"),
    ],
    ids=["http-500", "garbage", "truncated", "huge"],
)
async def test_bad_pods_are_counted_and_keep_their_last_metrics(pods, setup, reason):
    pod = await pods()
    store = Datastore()
    errors: list[str] = []
    s = scraper_for(pod, store, on_error=lambda _e, r: errors.append(r))
    assert await s.scrape_once()
    before = store.metrics(pod.endpoint.address)
    for k, v in setup.items():
        setattr(pod, k, v)
    assert not await s.scrape_once()
    assert errors == [reason] and s.errors == 1
    assert store.metrics(pod.endpoint.address) is before  # old data stays; its age makes it stale


async def test_unreachable_pod_is_a_connection_error():
    store = Datastore()
    ghost = Endpoint("127.0.0.1:9", "ghost")
    store.set_pool(pool([ghost]))
    errors: list[str] = []
    s = EndpointScraper(ghost, ENGINES["vllm"], store, timeout=2, on_error=lambda _e, r: errors.append(r))
    assert not await s.scrape_once() and errors == ["connection"] and store.metrics(ghost.address) is None


async def test_a_slow_pod_times_out_without_blocking_others(pods):
    slow = await pods(stall=asyncio.Event())
    fast = await pods()
    store = Datastore()
    errors: list[str] = []
    slow_s = scraper_for(slow, store, timeout=1.0, on_error=lambda _e, r: errors.append(r))
    fast_s = scraper_for(fast, store)
    slow_task = asyncio.create_task(slow_s.scrape_once())
    await slow.hit.wait()  # the slow scrape is in progress
    assert await fast_s.scrape_once()  # and the loop keeps serving others meanwhile
    assert not slow_task.done()
    assert await slow_task is False and errors == ["timeout"]


async def test_loops_follow_pool_membership(pods):
    a, b = await pods(), await pods()
    store = Datastore()
    store.set_pool(pool([a.endpoint, b.endpoint]))
    supervisor = Supervisor()
    loops = ScrapeLoops(store, supervisor, interval=0.02, timeout=1.0)
    loops.start()
    try:
        await asyncio.wait_for(asyncio.gather(a.hit.wait(), b.hit.wait()), 10)
        assert set(loops.scrapers) == {a.endpoint.address, b.endpoint.address}
        store.set_pool(pool([a.endpoint]))
        assert set(loops.scrapers) == {a.endpoint.address}
        seen_b = len(b.queries)
        for _ in range(3):  # a is still scraped ...
            a.hit.clear()
            await asyncio.wait_for(a.hit.wait(), 10)
        assert len(b.queries) <= seen_b + 1  # ... b no more (one request may have been on the wire)
    finally:
        loops.close()
        await supervisor.aclose()
    assert store.metrics(a.endpoint.address) is not None
