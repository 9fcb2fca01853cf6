"""Real Envoy + epp (in-process, real gRPC) + plain HTTP upstreams, all on 127.0.0.1.

Covers the core acceptance: routing in both body modes and both cluster kinds, the
(rewritten) body upstream, SSE pass-through with usage, body-less GETs, rejections
through Envoy, epp down (fail-open / fail-close), TLS to epp, and the served-endpoint
feedback when Envoy falls back to another host.
"""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
import pytest

from support import MODEL_LABELS
from support.envoy import subset_hint_filter
from support.upstreams import Upstream, wait_for_arrivals

COMPLETION = {"model": "m", "prompt": "Say hello", "max_tokens": 3}


MODES = [("full-duplex", "override-host"), ("full-duplex", "original-dst"),
         ("buffered", "override-host"), ("buffered", "original-dst")]


@pytest.mark.parametrize(("body_mode", "lb"), MODES, ids=[f"{b}-{lb}" for b, lb in MODES])
async def test_requests_land_on_the_endpoint_epp_chose_with_the_rewritten_body(gateway, body_mode, lb):
    gw = await gateway(body_mode=body_mode, lb=lb)
    hold = asyncio.Event()
    for u in gw.upstreams:  # keep all six in flight, so epp's load view has to spread them
        u.hold = hold
    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(gw.post({**COMPLETION, "prompt": f"hello {i}"})))
        await wait_for_arrivals(gw.upstreams, i + 1)  # one at a time: each pick sees the last
    hold.set()
    served = []
    for i, task in enumerate(tasks):
        status, headers, body = await asyncio.wait_for(task, 10)
        assert status == 200, body
        upstream = next(u for u in gw.upstreams if u.name == headers["x-served-by"])
        seen = next(s for s in upstream.seen if orjson.loads(s.body)["prompt"] == f"hello {i}")
        assert seen.headers["x-gateway-destination-endpoint"] == upstream.address  # epp's choice was honoured
        sent = orjson.loads(seen.body)
        assert sent["model"] == "m-target"
        if body_mode == "buffered" or "content-length" in seen.headers:
            assert int(seen.headers["content-length"]) == len(seen.body)
        assert orjson.loads(body)["model"] == "m"  # client-facing name restored
        served.append(upstream.name)
    assert sorted(served) == ["pod-0"] * 3 + ["pod-1"] * 3  # in-flight load spreads them evenly
    await gw.app.servicer.wait_idle()
    assert gw.app.datastore.load.total_inflight() == 0
    assert gw.value("inference_model_request_total", MODEL_LABELS) == 6
    assert gw.value("inference_model_output_tokens_sum", MODEL_LABELS) == 18


@pytest.mark.parametrize("body_mode", ["full-duplex", "buffered"])
async def test_sse_stream_reaches_the_client_intact_and_usage_is_counted(gateway, body_mode):
    gw = await gateway(body_mode=body_mode)
    doc = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, body = await gw.post(doc)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    texts = [orjson.loads(e[6:]) for e in events[:-1]]
    assert "".join(t["choices"][0]["text"] for t in texts[:3]) == f"Hello from {headers['x-served-by']}"
    assert all(t["model"] == "m" for t in texts)
    assert gw.value("inference_model_output_tokens_sum", MODEL_LABELS) == 3
    assert gw.value("inference_model_input_tokens_sum", MODEL_LABELS) == 7
    assert gw.app.datastore.load.total_inflight() == 0


@pytest.mark.parametrize("body_mode", ["full-duplex", "buffered"])
async def test_bodyless_get_is_routed(gateway, body_mode):
    gw = await gateway(body_mode=body_mode, lb="original-dst")
    async with gw.http.get(gw.url + "/v1/models", headers={"x-request-id": "req-42"}) as r:
        assert r.status == 200
        name = (await r.json())["served_by"]
    upstream = next(u for u in gw.upstreams if u.name == name)
    assert upstream.seen[-1].headers["x-gateway-destination-endpoint"] == upstream.address
    assert upstream.seen[-1].headers.get("x-request-id") == "req-42", upstream.seen[-1].headers
    assert gw.app.datastore.load.total_inflight() == 0


@pytest.mark.parametrize("body_mode", ["full-duplex", "buffered"])
async def test_bad_inputs_get_their_status_and_json_body_through_envoy(gateway, tmp_path, body_mode):
    gw = await gateway(body_mode=body_mode, max_body_bytes=4096)
    cases = [
        (b"{not json", 400),
        (orjson.dumps({"prompt": "no model"}), 400),
        (orjson.dumps({**COMPLETION, "model": "unknown"}), 404),
        (orjson.dumps({**COMPLETION, "prompt": "x" * 10_000}), 413),
    ]
    for data, expected in cases:
        status, headers, body = await gw.post(data=data)
        assert status == expected, (expected, body)
        assert headers["Content-Type"] == "application/json"
        err = orjson.loads(body)["error"]
        assert err["code"] == expected and err["message"]
    assert all(not u.seen for u in gw.upstreams)
    # no ready endpoint left (as when every pod of a Kubernetes pool turns NotReady) → 503
    pool = gw.app.datastore.pool
    assert pool is not None
    gw.app.datastore.set_pool(dataclasses.replace(pool, endpoints=()))
    status, _, body = await gw.post(COMPLETION)
    assert status == 503 and orjson.loads(body)["error"]["code"] == 503
    await gw.app.servicer.wait_idle()
    assert gw.app.datastore.load.total_inflight() == 0
    assert gw.value("inference_model_running_requests", {"model_name": "m"}) == 0
    status, _, _ = await gw.post(data=b"[]")  # and epp still serves
    assert status == 400


async def test_epp_down_fail_close_answers_5xx(gateway):
    gw = await gateway(failure_mode="FailClose")
    assert (await gw.post(COMPLETION))[0] == 200
    await gw.app.aclose()
    status, _, _ = await gw.post(COMPLETION)
    assert 500 <= status < 600


async def test_epp_down_fail_open_buffered_override_host_still_serves(gateway):
    gw = await gateway(failure_mode="FailOpen", body_mode="buffered", lb="override-host")
    await gw.app.aclose()
    served = set()
    for _ in range(4):
        status, headers, _ = await gw.post(COMPLETION)
        assert status == 200
        served.add(headers["x-served-by"])
    assert served == {"pod-0", "pod-1"}  # Envoy's round-robin fallback
    assert all("x-gateway-destination-endpoint" not in u.seen[-1].headers for u in gw.upstreams)


async def test_epp_down_fail_open_full_duplex_cannot_fail_open_once_a_body_arrived(gateway):
    """Envoy ignores failure_mode_allow in FULL_DUPLEX_STREAMED once body data arrived
    (ext_proc.cc failureModeAllow()); body-less requests still fail open."""
    gw = await gateway(failure_mode="FailOpen", body_mode="full-duplex", lb="override-host")
    await gw.app.aclose()
    status, _, _ = await gw.post(COMPLETION)
    assert status == 500
    async with gw.http.get(gw.url + "/v1/models") as r:
        assert r.status == 200


async def test_tls_to_epp_with_a_self_signed_certificate(gateway):
    gw = await gateway(tls=True)
    status, headers, _ = await gw.post(COMPLETION)
    assert status == 200
    (reached,) = [u for u in gw.upstreams if u.seen]
    # the pod that answered is the one epp chose, over its TLS ext_proc stream
    assert gw.by_address(reached.seen[-1].headers["x-gateway-destination-endpoint"]) is reached
    assert headers["x-served-by"] == reached.name
    assert gw.value("inference_model_request_total", MODEL_LABELS) == 1


async def test_served_endpoint_is_the_one_epp_accounts_when_envoy_falls_back(gateway):
    # epp knows pod-0 and an endpoint Envoy's cluster lacks; the hint forces epp to pick the latter,
    # override_host falls back to round-robin (pod-0) and reports it as served.
    ghost = "127.0.0.1:9"
    hold = asyncio.Event()
    gw = await gateway(n=1, epp_extra_endpoints=(ghost,), mutate=subset_hint_filter([ghost]))
    gw.upstreams[0].hold = hold
    task = asyncio.create_task(gw.post(COMPLETION))
    await asyncio.wait_for(gw.upstreams[0].arrived.wait(), 10)
    assert gw.upstreams[0].seen[-1].headers["x-gateway-destination-endpoint"] == ghost
    # the served endpoint arrives with the response headers: release the upstream and wait for them
    hold.set()
    status, headers, _ = await asyncio.wait_for(task, 10)
    assert status == 200 and headers["x-served-by"] == "pod-0"
    await gw.app.servicer.wait_idle()
    assert gw.app.datastore.load.total_inflight() == 0


async def test_served_endpoint_moves_the_inflight_claim_during_a_stream(gateway):
    ghost = "127.0.0.1:9"
    gw = await gateway(n=1, epp_extra_endpoints=(ghost,), mutate=subset_hint_filter([ghost]))
    pod = gw.upstreams[0]
    pod.hold_body = asyncio.Event()
    doc = {**COMPLETION, "stream": True}
    async with gw.http.post(gw.url + "/v1/completions", data=orjson.dumps(doc)) as r:
        assert r.status == 200
        # response headers have passed epp (full duplex holds them for its reply) and the
        # body is held open: the claim sits on the endpoint Envoy used
        assert gw.app.datastore.load.inflight(pod.address) == 1
        assert gw.app.datastore.load.inflight(ghost) == 0
        pod.hold_body.set()
        await r.read()
    await gw.app.servicer.wait_idle()
    assert gw.app.datastore.load.total_inflight() == 0


async def test_mirror_gets_a_copy_and_the_client_only_sees_the_primary(gateway):
    gw = await gateway(mirror=True)
    assert gw.shadow is not None and gw.app.datastore.pool_of(gw.shadow.address).name == "test-shadow"
    gw.shadow.status = 500
    for _ in range(3):
        status, headers, _ = await gw.post(COMPLETION)
        assert status == 200 and headers["x-served-by"].startswith("pod-")
    await wait_for_arrivals([gw.shadow], 3)  # mirrored requests are fire-and-forget: wait for them
    assert len(gw.shadow.seen) == 3
    assert all(s.headers["host"].split(":")[0].endswith("-shadow") for s in gw.shadow.seen)
    assert all(orjson.loads(s.body)["model"] == "m-target" for s in gw.shadow.seen)


async def test_slow_shadow_never_delays_the_primary(gateway):
    gw = await gateway(mirror=True)
    assert gw.shadow is not None and gw.app.datastore.pool_of(gw.shadow.address).name == "test-shadow"
    gw.shadow.hold = asyncio.Event()  # the shadow answers only when the test says so
    try:
        for _ in range(3):
            status, headers, _ = await asyncio.wait_for(gw.post(COMPLETION), 10)
            assert status == 200 and headers["x-served-by"].startswith("pod-")
        await asyncio.wait_for(gw.shadow.arrived.wait(), 10)  # copies are waiting at the shadow meanwhile
    finally:
        gw.shadow.hold.set()


async def test_plain_mirror_round_robins_and_a_dead_shadow_pod_never_affects_the_primary(gateway):
    live = await Upstream("shadow-live").start()
    try:
        gw = await gateway(shadows=["127.0.0.1:9", live.address], mirror_lb="plain")
        for _ in range(6):
            status, _, _ = await gw.post(COMPLETION)
            assert status == 200
        await wait_for_arrivals([live], 3)  # round-robin: every other copy goes to the dead pod and is lost
        assert len(live.seen) == 3
    finally:
        await live.aclose()


@pytest.mark.parametrize("mode", ["load-aware", "plain"])
async def test_load_aware_mirroring_sends_copies_to_the_least_loaded_shadow_pod(gateway, mode):
    from epp_sim import EngineConfig, MetricsOverride, PodConfig, SimFleet, get_profile

    async with SimFleet(PodConfig(engine=EngineConfig(profile=get_profile("fast"))), pods=2) as shadows:
        busy, idle = shadows.pods
        busy.set_metrics(MetricsOverride(waiting=12, running=30))  # what a loaded vLLM reports
        gw = await gateway(shadows=shadows.addresses, mirror_lb=mode, models=None, refresh_metrics_interval=3600.0)
        for address in shadows.addresses:
            assert await gw.app.scrapers.scrapers[address].scrape_once()
        doc = {"model": "/model/llama2", "prompt": "hello", "max_tokens": 2}
        for _ in range(6):
            assert (await gw.post(doc))[0] == 200
        if mode == "load-aware":
            await idle.requests_seen(6)
            assert busy.requests_received == 0  # every copy went to the idle pod
        else:
            await idle.requests_seen(3)
            await busy.requests_seen(3)  # round-robin ignores load
        print(f"{mode}: busy pod got {busy.requests_received} copies, idle pod {idle.requests_received}")


@pytest.mark.parametrize("body_mode", ["full-duplex", "buffered"])
async def test_a_pod_that_died_since_the_last_scrape_costs_a_retry_not_a_503(gateway, body_mode):
    # Envoy's cluster knows pod-1 but nothing listens there any more; epp (scraping off) still
    # picks it first half the time. The rendered retry policy takes the next address of epp's list.
    gw = await gateway(n=2, body_mode=body_mode, refresh_metrics_interval=0)
    dead = gw.upstreams[1]
    await dead.aclose()
    for _ in range(10):
        status, headers, _ = await gw.post(COMPLETION)
        assert status == 200 and headers["x-served-by"] == "pod-0"
    await gw.app.servicer.wait_idle()
    assert gw.app.datastore.load.total_inflight() == 0 and gw.app.datastore.load.inflight(dead.address) == 0


async def test_with_epp_down_a_client_cannot_pick_the_pod_with_its_own_destination_header(gateway):
    gw = await gateway(failure_mode="FailOpen", body_mode="buffered", lb="override-host")
    await gw.app.aclose()
    chosen = gw.upstreams[1].address
    served = set()
    for _ in range(4):
        status, headers, _ = await gw.post(COMPLETION, headers={"x-gateway-destination-endpoint": chosen})
        assert status == 200
        served.add(headers["x-served-by"])
    assert served == {"pod-0", "pod-1"}  # Envoy's round-robin, not the client's choice
    assert all("x-gateway-destination-endpoint" not in u.seen[-1].headers for u in gw.upstreams)


async def test_admin_paths_never_reach_a_pod_even_with_epp_down(gateway):
    gw = await gateway(failure_mode="FailOpen", body_mode="buffered", lb="override-host")
    status, _, body = await gw.post({"lora_name": "x", "lora_path": "/x"}, path="/v1/load_lora_adapter")
    assert status == 403 and orjson.loads(body)["error"]["code"] == 403
    await gw.app.aclose()
    status, _, _ = await gw.post({"lora_name": "x", "lora_path": "/x"}, path="/v1/load_lora_adapter")
    assert status == 403
    status, _, _ = await gw.post(COMPLETION)  # ordinary traffic still fails open
    assert status == 200
    assert all(not any(s.path.startswith("/v1/load_lora_adapter") for s in u.seen) for u in gw.upstreams)
