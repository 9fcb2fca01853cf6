"""epp reads real values from epp-sim pods: the scraper and the pool gauges, both metric formats,
and real load (queued requests) as well as injected values."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import aiohttp
import pytest

from epp.domain import InferenceRequest
from epp_sim import EngineConfig, MetricsOverride, PodConfig, SimFleet, SimPod, get_profile


@pytest.mark.parametrize("fmt", ["vllm-0.33", "vllm-legacy"])
async def test_epp_sees_sim_queue_kv_and_lora(write_pool, start_app, fmt):
    cfg = PodConfig(engine=EngineConfig(profile=get_profile("fast"), max_loras=2), metrics_format=fmt)
    async with SimFleet(cfg, pods=2) as fleet:
        app = await start_app(write_pool(fleet.addresses), refresh_metrics_interval=3600.0)
        a, b = fleet.pods
        a.set_metrics(MetricsOverride(waiting=7, running=3, kv_usage=0.9, running_adapters=("sql-lora",),
                                      waiting_adapters=("tweet-summary",)))
        assert set(app.scrapers.scrapers) == set(fleet.addresses)  # one scraper per pod, or the loop proves nothing
        for scraper in app.scrapers.scrapers.values():
            assert await scraper.scrape_once()
        ma = app.datastore.metrics(a.url.removeprefix("http://"))
        mb = app.datastore.metrics(b.url.removeprefix("http://"))
        assert ma is not None and mb is not None
        assert (ma.waiting, ma.running, ma.kv_usage) == (7, 3, pytest.approx(0.9))
        assert ma.active_adapters == {"sql-lora"} and ma.waiting_adapters == {"tweet-summary"}
        assert (ma.max_lora, ma.block_size) == (2, 16) and ma.num_blocks > 0
        assert (mb.waiting, mb.running) == (0, 0)
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{app.metrics_port}/metrics") as r:
            text = await r.text()
        assert 'inference_pool_ready_pods{name="test-pool"} 2.0' in text
        assert 'inference_pool_average_queue_size{name="test-pool"} 3.5' in text
        assert 'inference_pool_average_kv_cache_utilization{name="test-pool"}' in text


async def test_epp_sees_real_queueing_on_a_paused_pod(write_pool, start_app):
    cfg = PodConfig(engine=EngineConfig(profile=get_profile("fast")))
    async with SimFleet(cfg, pods=1) as fleet, aiohttp.ClientSession() as http:
        app = await start_app(write_pool(fleet.addresses), refresh_metrics_interval=3600.0)
        pod = fleet.pods[0]
        pod.pause()  # requests queue up and the gauges show them, as a busy vLLM would
        body = {"model": "/model/llama2", "prompt": "hello " * 50, "max_tokens": 8}
        posts = [asyncio.create_task(http.post(pod.url + "/v1/completions", json=body)) for _ in range(3)]
        await pod.requests_seen(3)
        (scraper,) = app.scrapers.scrapers.values()
        assert await scraper.scrape_once()
        m = app.datastore.metrics(pod.url.removeprefix("http://"))
        assert m is not None and m.waiting + m.running == 3
        pod.resume()
        for resp in await asyncio.gather(*posts):
            assert resp.status == 200
            resp.release()
        await pod.idle()
        assert await scraper.scrape_once()
        m = app.datastore.metrics(pod.url.removeprefix("http://"))
        assert m is not None and (m.waiting, m.running) == (0, 0)


def _request(model: str) -> InferenceRequest:
    return InferenceRequest(request_id="r", model=model, target_model=model, prompt="hi")


async def _scrape_all(app) -> None:
    assert app.scrapers.scrapers  # one scraper per pod, or the loop proves nothing
    for scraper in app.scrapers.scrapers.values():
        assert await scraper.scrape_once()
        assert await scraper.models_once()


async def test_adapter_requests_go_only_to_pods_whose_v1_models_lists_the_adapter(write_pool, start_app):
    cfg = PodConfig(engine=EngineConfig(profile=get_profile("fast"), max_loras=2))
    async with SimFleet(cfg, pods=3) as fleet:
        holder, *others = fleet.pods
        for pod in others:
            pod.adapters.clear()  # only the first pod has sql-lora loaded (idle: no lora_requests_info)
        app = await start_app(write_pool(fleet.addresses), refresh_metrics_interval=3600.0)
        await _scrape_all(app)
        assert app.datastore.servers_of("sql-lora") == {holder.address}
        picks = Counter(app.router.route(_request("sql-lora")).primary.address for _ in range(30))
        assert picks == {holder.address: 30}
        base = Counter(app.router.route(_request("/model/llama2")).primary.address for _ in range(30))
        assert set(base) == set(fleet.addresses)  # the base model is everywhere: no narrowing
        others[0].adapters["sql-lora"] = "/adapters/sql-lora"  # loaded on a second pod: learnt at its next read
        assert await app.scrapers.scrapers[others[0].address].models_once()
        picks = Counter(app.router.route(_request("sql-lora")).primary.address for _ in range(40))
        assert set(picks) == {holder.address, others[0].address}


async def test_a_killed_pod_is_dropped_at_its_first_refused_connection_and_back_when_it_answers(write_pool, start_app):
    cfg = PodConfig(engine=EngineConfig(profile=get_profile("fast")))
    async with SimFleet(cfg, pods=2) as fleet:
        alive, dead = fleet.pods
        app = await start_app(write_pool(fleet.addresses), refresh_metrics_interval=3600.0)
        await _scrape_all(app)
        address, port = dead.address, int(dead.address.rsplit(":", 1)[1])
        await dead.aclose()  # the pod is killed: nothing listens there any more
        assert not await app.scrapers.scrapers[address].scrape_once()
        assert app.datastore.fresh_metrics(address) is not None  # its last metrics are still "fresh" ...
        assert [e.address for e in app.datastore.routable()] == [alive.address]  # ... but it is not picked
        assert {app.router.route(_request("/model/llama2")).primary.address for _ in range(20)} == {alive.address}
        restarted = SimPod(dataclasses.replace(dead.config))
        await restarted.start(port=port)
        try:
            assert await app.scrapers.scrapers[address].scrape_once()
            assert {e.address for e in app.datastore.routable()} == set(fleet.addresses)
        finally:
            await restarted.aclose()
