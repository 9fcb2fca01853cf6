"""GIE's conformance assertions about the EPP, ported to local tests on the gateways' wirings.

epp runs with its conformance test hooks (``--conformance-test-hooks``): the request
header ``test-epp-endpoint-selection`` designates the endpoints, the response header
``x-conformance-test-served-endpoint`` echoes what the gateway reports as served.  The
wirings: Envoy Gateway's render of ``overlays/envoy-gateway`` (egctl), Envoy AI Gateway's
(``epp envoy-config --wiring envoy-ai-gateway``), and ``epp envoy-config``'s own for
contrast.  Pods have distinct loopback IPs, as pods in a cluster do.

Ported (GIE ``conformance/tests``): GatewayFollowingEPPRouting (1, 2 and 3 designated pods,
100 requests at concurrency 10), GatewayFollowingEPPRoutingWithDataParallelism (three
target ports per pod), GatewayWeightedAcrossTwoInferencePools (70/30 over 200 requests,
within max(0.10, 4.5 sigma)), GatewayDestinationEndpointServed, EppUnAvailableFailOpen.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

import orjson
import pytest

from epp.config import load_pool_file
from epp.envoy.ai_gateway import filter_name, render_ai_gateway_bootstrap, route_cluster_name

from .harness import COMPLETION, Pod, Stack, Stacks
from .scenario import REQUEST, start, start_ai_gateway, start_epp_wiring
from .xds import Dump
from support import MODELS, pool_doc, write_yaml

SELECT = "test-epp-endpoint-selection"
SERVED = "x-conformance-test-served-endpoint"
HOSTS = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
WIRINGS = ["envoy-gateway", "envoy-ai-gateway", "epp-envoy-config"]


async def _stack(wiring: str, stacks: Stacks, renders: Any, pods: list[Pod], **overrides: Any) -> Stack:
    if wiring == "envoy-gateway":
        return await start(stacks, Dump(renders.dump("seed")), renders.docs("seed"), pods=pods,
                           conformance_test_hooks=True, **overrides)
    if wiring == "envoy-ai-gateway":
        return await start_ai_gateway(stacks, pods=pods, conformance_test_hooks=True,
                                      **overrides)
    return await start_epp_wiring(stacks, pods=pods, conformance_test_hooks=True, **overrides)


def _request(wiring: str, i: int) -> dict[str, Any]:
    base = REQUEST if wiring == "envoy-gateway" else COMPLETION
    return {**base, "prompt": f"request {i}: {'x' * (i % 7)}"}  # distinct prompts: no prefix affinity


async def _burst(gw: Stack, wiring: str, n: int, concurrency: int, headers: dict[str, str]) -> list[str]:
    """``n`` requests, ``concurrency`` at a time; the pod address that answered each."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        async with gate:
            status, hdrs, body = await gw.post(_request(wiring, i), headers=headers)
        assert status == 200, body[:200]
        return gw.by_name(hdrs["x-served-by"]).address

    return list(await asyncio.gather(*(one(i) for i in range(n))))


@pytest.mark.parametrize("designated", [1, 2, 3], ids=["one-pod", "two-pods", "three-pods"])
@pytest.mark.parametrize("wiring", WIRINGS)
async def test_gateway_follows_epp_routing(stacks, renders, wiring, designated):
    pods = await stacks.pods(3, hosts=HOSTS)
    gw = await _stack(wiring, stacks, renders, pods)
    chosen = HOSTS[:designated]
    served = await _burst(gw, wiring, 100, 10, {SELECT: ",".join(chosen)})
    counts = Counter(a.rpartition(":")[0] for a in served)
    assert set(counts) == set(chosen), counts  # only designated pods, and every one of them
    assert sum(counts.values()) == 100
    await gw.idle()
    assert gw.app.datastore.load.total_inflight() == 0


@pytest.mark.parametrize("wiring", WIRINGS)
async def test_gateway_follows_epp_routing_with_data_parallel_ranks(stacks, renders, wiring):
    """Three target ports (ranks) per pod: an ``ip:port`` designation pins the rank."""
    pods = [*await stacks.pods(3, hosts=[HOSTS[0]] * 3, prefix="dp-a"),
            *await stacks.pods(3, hosts=[HOSTS[1]] * 3, prefix="dp-b")]
    gw = await _stack(wiring, stacks, renders, pods)
    ranks = [pods[0].address, pods[4].address]  # rank 0 of pod a, rank 1 of pod b
    served = await _burst(gw, wiring, 60, 10, {SELECT: ",".join(ranks)})
    assert set(served) == set(ranks)
    served = await _burst(gw, wiring, 60, 10, {SELECT: HOSTS[1]})  # a bare IP: any rank of that pod
    assert {a.rpartition(":")[0] for a in served} == {HOSTS[1]} and len(set(served)) > 1
    await gw.idle()
    assert gw.app.datastore.load.total_inflight() == 0


SERVED_REPORTED = {"envoy-gateway": False, "envoy-ai-gateway": False, "epp-envoy-config": True}


@pytest.mark.parametrize("wiring", WIRINGS)
async def test_gateway_destination_endpoint_served(stacks, renders, wiring):
    """Passes only where the gateway reports the served endpoint (override_host's
    selected_host_key, forwarded as envoy.lb metadata): ORIGINAL_DST writes nothing, and
    Envoy AI Gateway forwards no metadata at all."""
    pods = await stacks.pods(3, hosts=HOSTS)
    gw = await _stack(wiring, stacks, renders, pods)
    status, headers, _ = await gw.post(_request(wiring, 0), headers={SELECT: HOSTS[2]})
    assert status == 200 and headers["x-served-by"] == "pod-2"
    if SERVED_REPORTED[wiring]:
        assert headers[SERVED] == pods[2].address
    else:
        assert SERVED not in headers


FAIL_OPEN = {  # the status with epp down, for a FailOpen pool
    "envoy-gateway": 503,  # failOpen lets it pass, ORIGINAL_DST has nothing to dial
    "envoy-ai-gateway": 500,  # failure_mode_allow is hard-coded false
    "epp-envoy-config": 200,  # buffered + override_host: round-robin fallback
}


@pytest.mark.parametrize("wiring", WIRINGS)
async def test_epp_unavailable_fail_open(stacks, renders, wiring):
    pods = await stacks.pods(3, hosts=HOSTS)
    if wiring == "envoy-gateway":
        gw = await start(stacks, Dump(renders.dump("fail-open")), renders.docs("fail-open"), pods=pods,
                         conformance_test_hooks=True)
    elif wiring == "envoy-ai-gateway":
        gw = await start_ai_gateway(stacks, pods=pods, failure_mode="FailOpen", conformance_test_hooks=True)
    else:
        gw = await start_epp_wiring(stacks, pods=pods, body_mode="buffered", failure_mode="FailOpen",
                                    conformance_test_hooks=True)
    served = await _burst(gw, wiring, 10, 5, {SELECT: HOSTS[1]})  # phase 1: routing follows epp
    assert set(served) == {pods[1].address}
    await gw.app.aclose()  # phase 2: epp unavailable
    statuses = [(await gw.post(_request(wiring, i)))[0] for i in range(6)]
    assert statuses == [FAIL_OPEN[wiring]] * 6


# ---- two pools, one route, weighted ---------------------------------------------------------


def _two_pool_weighted(a: dict[str, Any], b: dict[str, Any], weights: tuple[int, int]) -> dict[str, Any]:
    """Envoy AI Gateway's per-pool pieces (ext_proc filter, EPP cluster, ORIGINAL_DST cluster)
    for two pools behind one route with weighted clusters, each cluster enabling only its
    own pool's filter.  Envoy AI Gateway itself refuses two InferencePools in one rule
    (``PostClusterModify``: "at most one inferencepool can be referenced per route rule"),
    so this is what a gateway must render to pass the test, built from its parts."""
    out = a
    hcm_a = a["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm_b = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filter_a, filter_b = hcm_a["http_filters"][0], hcm_b["http_filters"][0]
    hcm_a["http_filters"].insert(1, filter_b)
    cluster_a = route_cluster_name("default", "pool-a")
    cluster_b = route_cluster_name("default", "pool-b")
    out["static_resources"]["clusters"] += b["static_resources"]["clusters"]
    disabled = {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "disabled": True}
    (route,) = hcm_a["route_config"]["virtual_hosts"][0]["routes"]
    action = route["route"]
    del action["cluster"]
    action["weighted_clusters"] = {"clusters": [
        {"name": cluster_a, "weight": weights[0], "typed_per_filter_config": {filter_b["name"]: disabled}},
        {"name": cluster_b, "weight": weights[1], "typed_per_filter_config": {filter_a["name"]: disabled}},
    ]}
    return out


async def test_gateway_weighted_across_two_inference_pools(stacks):
    pods_a = await stacks.pods(2, hosts=HOSTS[:2], prefix="a")
    pods_b = await stacks.pods(1, hosts=HOSTS[2:], prefix="b")
    configs, apps = [], []
    for name, pods in (("pool-a", pods_a), ("pool-b", pods_b)):
        pool = write_yaml(stacks.path(f"{name}.yaml"), pool_doc([p.address for p in pods], models=MODELS, name=name))
        app = await stacks.app(pool, secure_serving=True, conformance_test_hooks=True)
        apps.append(app)
        configs.append(render_ai_gateway_bootstrap(load_pool_file(pool), listen_port=0,
                                                   epp_address=f"127.0.0.1:{app.grpc_port}"))
    config = _two_pool_weighted(*configs, weights=(70, 30))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == [
        filter_name("pool-a", "default"), filter_name("pool-b", "default"), "envoy.filters.http.router"]
    envoy, url = await stacks.envoy(config)
    gw = Stack(url, envoy, await stacks.session(), [*pods_a, *pods_b])
    n = 200
    # every pod is designated, so the split is the gateway's and each epp only knows its own pool
    served = await _burst(gw, "envoy-ai-gateway", n, 10, {SELECT: ",".join(HOSTS)})
    in_a = sum(1 for a in served if a in {p.address for p in pods_a})
    in_b = sum(1 for a in served if a in {p.address for p in pods_b})
    assert in_a + in_b == n  # every request landed in the pool its weighted cluster chose
    share = in_a / n
    tolerance = max(0.10, 4.5 * math.sqrt(0.7 * 0.3 / n))
    assert abs(share - 0.7) <= tolerance, (in_a, in_b)
    for app, pods in zip(apps, (pods_a, pods_b), strict=True):
        await asyncio.wait_for(app.servicer.wait_idle(), 10)
        assert app.datastore.load.total_inflight() == 0
        assert {e.address for e in app.datastore.endpoints()} == {p.address for p in pods}
    assert all(p.seen for p in [*pods_a, *pods_b])
    # both epps saw exactly the requests of their pool
    assert sum(len(p.seen) for p in pods_a) == in_a and sum(len(p.seen) for p in pods_b) == in_b
    assert orjson.loads(pods_b[0].seen[0].body)["model"] == "m-target"
