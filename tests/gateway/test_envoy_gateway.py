"""The project's manifests as Envoy Gateway renders them, run on real Envoy against epp.

``manifests/scenario/overlays/envoy-gateway`` (the seed-era wiring: Envoy Gateway alone,
an EnvoyExtensionPolicy calling epp with a Buffered request body, an EnvoyPatchPolicy
adding the ORIGINAL_DST cluster and TLS to epp, a ClientTrafficPolicy raising the buffer
limit) is rendered by ``egctl x translate``; the dump becomes a static bootstrap whose
every endpoint is a loopback one (pods, shadow pods, epp), and real Envoy runs it.
``load-aware-mirror``'s EnvoyPatchPolicy is rendered on top, as applied on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from .harness import BIG_PROMPT_CHARS, assert_loopback_only, non_loopback
from .scenario import (
    EXTPROC_CLUSTER,
    LABELS,
    LISTENER,
    MIRROR_CLUSTER,
    REQUEST,
    ROUTE_CLUSTER,
    post,
    start,
)
from .xds import Dump, hcms, static_bootstrap
from support.upstreams import wait_for_arrivals


def _ext_proc(listener: dict[str, Any]) -> dict[str, Any]:
    (hcm,) = hcms(listener)
    (f,) = [f for f in hcm["httpFilters"] if f["name"].startswith("envoy.filters.http.ext_proc")]
    return f


# ---- what egctl renders --------------------------------------------------------------------


def test_egctl_renders_the_seed_era_wiring(seed):
    listener = seed.listener(LISTENER)
    ext_proc = _ext_proc(listener)
    cfg = ext_proc["typedConfig"]
    assert cfg["processingMode"] == {
        "requestHeaderMode": "SEND", "requestBodyMode": "BUFFERED", "requestTrailerMode": "SKIP",
        "responseHeaderMode": "SEND", "responseBodyMode": "STREAMED", "responseTrailerMode": "SKIP",
    }
    assert cfg["messageTimeout"] == "300s" and cfg.get("failureModeAllow", False) is False
    assert cfg["grpcService"]["envoyGrpc"]["clusterName"] == EXTPROC_CLUSTER
    assert ext_proc["disabled"] is True  # on the HCM, enabled per route
    assert listener["perConnectionBufferLimitBytes"] == 20 * 1024 * 1024  # the ClientTrafficPolicy
    (route,) = seed.routes[LISTENER]["virtualHosts"][0]["routes"]
    assert route["route"]["cluster"] == "original_destination_cluster"  # the patch replaced the Service's
    assert ext_proc["name"] in route["typedPerFilterConfig"]
    (mirror,) = route["route"]["requestMirrorPolicies"]
    assert mirror["cluster"] == MIRROR_CLUSTER and mirror["runtimeFraction"]["defaultValue"]["numerator"] == 100
    clusters = seed.clusters
    assert clusters["original_destination_cluster"]["originalDstLbConfig"] == {
        "httpHeaderName": "x-gateway-destination-endpoint", "useHttpHeader": True}
    assert clusters[EXTPROC_CLUSTER]["transportSocket"]["name"] == "envoy.transport_sockets.tls"
    # egctl invented endpoints: what static_bootstrap must replace
    assert "1.2.3.4" in non_loopback(seed.endpoints)


def test_every_address_is_replaced_by_a_loopback_one(seed):
    config = static_bootstrap(seed, {ROUTE_CLUSTER: ["127.0.0.1:1"], MIRROR_CLUSTER: ["127.0.0.2:2"],
                                     EXTPROC_CLUSTER: ["127.0.0.1:3"]})  # fmt: skip
    assert_loopback_only(config)
    assert non_loopback(seed.listeners)  # the render listens on 0.0.0.0 ...
    with pytest.raises(AssertionError, match="no loopback replacement"):  # ... and an unmapped cluster is refused
        static_bootstrap(seed, {ROUTE_CLUSTER: ["127.0.0.1:1"], EXTPROC_CLUSTER: ["127.0.0.1:3"]})
    with pytest.raises(AssertionError, match="non-loopback"):
        assert_loopback_only({**config, "stray": {"socket_address": {"address": "10.1.2.3"}}})
    with pytest.raises(AssertionError, match="not loopback IP literals"):
        assert_loopback_only({**config, "stray": {"socket_address": {"address": "foo.bar.com"}}})


def _lb_policy(cluster: dict[str, Any]) -> str:
    (policy,) = cluster["loadBalancingPolicy"]["policies"]
    return str(policy["typedExtensionConfig"]["name"])


def test_the_load_aware_patch_lands_on_the_mirror_cluster_egctl_names(load_aware, renders):
    cluster = load_aware.clusters[MIRROR_CLUSTER]
    assert _lb_policy(cluster) == "envoy.load_balancing_policies.override_host"
    (policy,) = cluster["loadBalancingPolicy"]["policies"]
    assert policy["typedExtensionConfig"]["typedConfig"]["overrideHostSources"] == [
        {"header": "x-gateway-mirror-endpoint"}]
    # the overlay itself (v1, for Envoy AI Gateway) names the same cluster: egctl renders it
    # without the InferencePool (it cannot load one) and the patch lands there too
    overlay = Dump(renders.dump("load-aware-mirror-overlay"))
    assert _lb_policy(overlay.clusters[MIRROR_CLUSTER]) == "envoy.load_balancing_policies.override_host"


def test_without_its_namespace_the_patch_silently_does_not_apply(renders):
    dump = Dump(renders.dump("patch-without-namespace"))  # lands in Envoy Gateway's own namespace
    assert _lb_policy(dump.clusters[MIRROR_CLUSTER]) == "envoy.load_balancing_policies.least_request"


# ---- the rendered wiring on real Envoy -------------------------------------------------------

# the seed-era render, and the same with load-aware-mirror's patch policy applied on top
RENDERS = pytest.mark.parametrize("render", ["seed", "load-aware"])


@RENDERS
async def test_pick_honoured_mirrored_once_and_the_client_sees_only_the_primary(stacks, renders, render):
    seed, seed_docs = Dump(renders.dump(render)), renders.docs(render)
    gw = await start(stacks, seed, seed_docs)
    (shadow,) = gw.shadows
    shadow.status = 500  # the shadow's answer must never reach the client
    hold = asyncio.Event()
    for pod in gw.pods:
        pod.hold = hold
    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(post(gw, {**REQUEST, "prompt": f"hello {i}"})))
        await wait_for_arrivals(gw.pods, i + 1)
    hold.set()
    served = []
    for i, task in enumerate(tasks):
        status, headers, body = await asyncio.wait_for(task, 10)
        assert status == 200, body
        pod = gw.by_name(headers["x-served-by"])
        (seen,) = [s for s in pod.seen if orjson.loads(s.body)["prompt"] == f"hello {i}"]
        assert seen.headers["x-gateway-destination-endpoint"] == pod.address  # epp's pick
        served.append(pod.name)
    assert sorted(served) == ["pod-0"] * 3 + ["pod-1"] * 3  # spread by epp's in-flight view
    await wait_for_arrivals([shadow], 6)
    assert sorted(orjson.loads(s.body)["prompt"] for s in shadow.seen) == [f"hello {i}" for i in range(6)]
    await gw.idle()
    assert gw.app.datastore.load.total_inflight() == 0
    assert gw.value("inference_model_request_total", LABELS) == 6


@RENDERS
async def test_rejections_reach_the_client_as_json(stacks, renders, render):
    seed, seed_docs = Dump(renders.dump(render)), renders.docs(render)
    gw = await start(stacks, seed, seed_docs, max_body_bytes=64 * 1024, conformance_test_hooks=True)
    cases = [
        (b"{not json", 400),
        (orjson.dumps({"prompt": "no model"}), 400),
        (orjson.dumps({**REQUEST, "model": "sql-lora"}), 404),  # an adapter the pool file does not list
        (orjson.dumps({**REQUEST, "prompt": "x" * 100_000}), 413),  # epp's limit, not Envoy's buffer
    ]
    for data, expected in cases:
        status, headers, body = await post(gw, data=data)
        assert status == expected, (expected, body[:200])
        assert headers["content-type"] == "application/json"
        assert orjson.loads(body)["error"]["code"] == expected
    status, headers, body = await post(gw, REQUEST, headers={"test-epp-endpoint-selection": "127.0.0.99"})
    assert status == 503 and orjson.loads(body)["error"]["code"] == 503
    assert all(not p.seen for p in gw.pods)
    await gw.idle()
    assert gw.app.datastore.load.total_inflight() == 0


@RENDERS
async def test_sse_stream_and_usage(stacks, renders, render):
    seed, seed_docs = Dump(renders.dump(render)), renders.docs(render)
    gw = await start(stacks, seed, seed_docs)
    status, headers, body = await post(gw, {**REQUEST, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert "".join(orjson.loads(e[6:])["choices"][0]["text"] for e in events[:3]) == (
        f"Hello from {headers['x-served-by']}")
    await gw.idle()
    assert gw.value("inference_model_output_tokens_sum", LABELS) == 3
    assert gw.app.datastore.load.total_inflight() == 0


@RENDERS
async def test_a_200kb_prompt_reaches_a_pod_and_the_shadow(stacks, renders, render):
    seed, seed_docs = Dump(renders.dump(render)), renders.docs(render)
    gw = await start(stacks, seed, seed_docs)
    prompt = "".join(chr(ord("a") + i % 26) for i in range(BIG_PROMPT_CHARS))
    status, headers, body = await post(gw, {**REQUEST, "prompt": prompt})
    assert status == 200, body[:300]
    (seen,) = gw.by_name(headers["x-served-by"]).seen
    assert orjson.loads(seen.body)["prompt"] == prompt
    await wait_for_arrivals(gw.shadows, 1)
    assert orjson.loads(gw.shadows[0].seen[0].body)["prompt"] == prompt
    await gw.idle()
    assert gw.app.datastore.load.total_inflight() == 0


@RENDERS
async def test_epp_down_fails_closed(stacks, renders, render):
    seed, seed_docs = Dump(renders.dump(render)), renders.docs(render)
    gw = await start(stacks, seed, seed_docs)
    assert (await post(gw, REQUEST))[0] == 200
    await gw.app.aclose()
    status, _, _ = await post(gw, REQUEST)
    assert status == 500
    assert len([s for p in gw.pods for s in p.seen]) == 1


def _copies_that_followed_epp(shadows: Sequence[Any]) -> tuple[int, int]:
    copies = [(s.headers.get("x-gateway-mirror-endpoint"), shadow.address) for shadow in shadows for s in shadow.seen]
    return sum(1 for picked, got in copies if picked == got), len(copies)


async def test_with_the_load_aware_patch_every_mirrored_copy_goes_where_epp_said(stacks, load_aware, seed_docs):
    gw = await start(stacks, load_aware, seed_docs, shadows=2, mirror_in_epp=True)
    n = 16
    for i in range(n):
        assert (await post(gw, {**REQUEST, "prompt": f"m{i}"}))[0] == 200
    await wait_for_arrivals(gw.shadows, n)
    followed, total = _copies_that_followed_epp(gw.shadows)
    assert (followed, total) == (n, n)
    assert all(s.seen for s in gw.shadows)  # epp's least-loaded pick spread them over both


async def test_without_the_patch_the_copies_ignore_epps_pick(stacks, seed, seed_docs):
    gw = await start(stacks, seed, seed_docs, shadows=2, mirror_in_epp=True)
    n = 16
    for i in range(n):
        assert (await post(gw, {**REQUEST, "prompt": f"m{i}"}))[0] == 200
    await wait_for_arrivals(gw.shadows, n)
    followed, total = _copies_that_followed_epp(gw.shadows)
    assert total == n and followed < n  # Envoy's own least-request balancing decides



async def test_without_the_buffer_policy_envoy_refuses_a_long_prompt_before_epp_sees_it(stacks, renders):
    """Envoy Gateway's default 32 KiB buffer with a Buffered request body: Envoy's own
    plain-text 413 for anything longer (the ClientTrafficPolicy of the overlay fixes it)."""
    dump = Dump(renders.dump("default-buffer"))
    assert dump.listener(LISTENER)["perConnectionBufferLimitBytes"] == 32768
    gw = await start(stacks, dump, renders.docs("default-buffer"))
    assert (await post(gw, {**REQUEST, "prompt": "x" * 20_000}))[0] == 200
    status, headers, body = await post(gw, {**REQUEST, "prompt": "x" * 40_000})
    assert status == 413 and headers["content-type"] == "text/plain" and body == b"Payload Too Large"
    assert gw.value("inference_model_request_total", LABELS) == 1  # epp never saw the second one


async def test_fail_open_cannot_route_without_epp_on_original_dst(stacks, renders):
    """failOpen: true lets the request past a dead epp, but the ORIGINAL_DST cluster has no
    header to dial and no endpoints of its own: 503, not a fallback pod (GIE's
    EppUnAvailableFailOpen cannot pass on this wiring)."""
    dump = Dump(renders.dump("fail-open"))
    (hcm,) = hcms(dump.listener(LISTENER))
    (ext_proc,) = [f for f in hcm["httpFilters"] if f["name"].startswith("envoy.filters.http.ext_proc")]
    assert ext_proc["typedConfig"]["failureModeAllow"] is True
    gw = await start(stacks, dump, renders.docs("fail-open"))
    assert gw.app.datastore.pool.failure_mode == "FailOpen"
    assert (await post(gw, REQUEST))[0] == 200
    await gw.app.aclose()
    status, _, _ = await post(gw, REQUEST)
    assert status == 503
    assert sum(len(p.seen) for p in gw.pods) == 1
