"""epp behind Envoy AI Gateway's wiring (``epp envoy-config --wiring envoy-ai-gateway``):
real Envoy, epp in-process over real gRPC with TLS, HTTP pods, all on 127.0.0.1.

The shape (``epp.envoy.ai_gateway``): both bodies FULL_DUPLEX_STREAMED, headers and
trailers SEND, message_timeout 300 s, failure_mode_allow false, no metadata_options,
ORIGINAL_DST on the destination header, TLS to epp without verification, Envoy
Gateway's 32 KiB buffers.  The core cases hold; what needs metadata degrades, and the
tests below say how.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import yaml

from epp.config import parse_pool_file
from epp.envoy.ai_gateway import EG_BUFFER_LIMIT, epp_cluster_name, filter_name, render_ai_gateway_bootstrap

from . import egctl
from .harness import BIG_PROMPT_CHARS, COMPLETION
from .scenario import start_ai_gateway
from support import MODEL_LABELS, pool_doc
from support.envoy import insert_subset_hint
from support.upstreams import wait_for_arrivals

aigw = start_ai_gateway


def _ext_proc(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (ext_proc,) = [f for f in hcm["http_filters"] if f["name"].startswith("envoy.filters.http.ext_proc")]
    return ext_proc


async def test_the_rendered_shape_is_envoy_ai_gateways(stacks):
    gw = await aigw(stacks)
    ext_proc = _ext_proc(gw.config)
    assert ext_proc["name"] == filter_name("test-pool", "default")
    cfg = ext_proc["typed_config"]
    assert cfg["processing_mode"] == {
        "request_header_mode": "SEND", "request_body_mode": "FULL_DUPLEX_STREAMED", "request_trailer_mode": "SEND",
        "response_header_mode": "SEND", "response_body_mode": "FULL_DUPLEX_STREAMED", "response_trailer_mode": "SEND",
    }
    assert (cfg["message_timeout"], cfg["failure_mode_allow"], cfg["allow_mode_override"]) == ("300s", False, False)
    assert "metadata_options" not in cfg
    assert cfg["grpc_service"]["envoy_grpc"]["authority"] == f"test-pool-epp.default.svc:{gw.app.grpc_port}"
    clusters = {c["name"]: c for c in gw.config["static_resources"]["clusters"]}
    epp = clusters[epp_cluster_name("test-pool", "default")]
    assert epp["transport_socket"]["typed_config"]["common_tls_context"] == {"validation_context": {}}
    assert (epp["type"], epp["lb_policy"]) == ("STRICT_DNS", "LEAST_REQUEST")
    (pool_cluster,) = [c for c in clusters.values() if c["type"] == "ORIGINAL_DST"]
    assert pool_cluster["original_dst_lb_config"] == {
        "use_http_header": True, "http_header_name": "x-gateway-destination-endpoint"}
    assert gw.config["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == EG_BUFFER_LIMIT
    # and Envoy runs it: one request through, over TLS with a foreign authority
    status, _, body = await gw.post(COMPLETION)
    assert status == 200, body


async def test_pick_honoured_and_spread_by_epps_load_view(stacks):
    gw = await aigw(stacks)
    hold = asyncio.Event()
    for pod in gw.pods:
        pod.hold = hold
    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(gw.post({**COMPLETION, "prompt": f"hello {i}"})))
        await wait_for_arrivals(gw.pods, i + 1)
    hold.set()
    served = []
    for i, task in enumerate(tasks):
        status, headers, body = await asyncio.wait_for(task, 10)
        assert status == 200, body
        pod = gw.by_name(headers["x-served-by"])
        seen = next(s for s in pod.seen if orjson.loads(s.body)["prompt"] == f"hello {i}")
        assert seen.headers["x-gateway-destination-endpoint"] == pod.address  # ORIGINAL_DST dialled epp's pick
        assert orjson.loads(seen.body)["model"] == "m-target" and orjson.loads(body)["model"] == "m"
        served.append(pod.name)
    assert sorted(served) == ["pod-0"] * 3 + ["pod-1"] * 3
    await gw.idle()
    assert gw.app.datastore.load.total_inflight() == 0
    assert gw.value("inference_model_request_total", MODEL_LABELS) == 6


async def test_rejections_reach_the_client_as_json(stacks):
    gw = await aigw(stacks, max_body_bytes=64 * 1024, conformance_test_hooks=True)
    cases = [
        (b"{not json", 400),
        (orjson.dumps({"prompt": "no model"}), 400),
        (orjson.dumps({**COMPLETION, "model": "unknown"}), 404),
        (orjson.dumps({**COMPLETION, "prompt": "x" * 100_000}), 413),
    ]
    for data, expected in cases:
        status, headers, body = await gw.post(data=data)
        assert status == expected, (expected, body)
        assert headers["content-type"] == "application/json"
        assert orjson.loads(body)["error"]["code"] == expected
    assert all(not p.seen for p in gw.pods)
    # no endpoint left to pick from (here: the conformance hook designates none of the pool's)
    status, headers, body = await gw.post(COMPLETION, headers={"test-epp-endpoint-selection": "127.0.0.99"})
    assert status == 503 and headers["content-type"] == "application/json"
    assert orjson.loads(body)["error"]["code"] == 503
    await gw.idle()
    assert gw.app.datastore.load.total_inflight() == 0


async def test_sse_stream_and_usage(stacks):
    gw = await aigw(stacks)
    status, headers, body = await gw.post({**COMPLETION, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:3]) == f"Hello from {headers['x-served-by']}"
    assert all(c["model"] == "m" for c in chunks)
    await gw.idle()
    assert gw.value("inference_model_output_tokens_sum", MODEL_LABELS) == 3
    assert gw.app.datastore.load.total_inflight() == 0


async def test_a_200kb_prompt_reaches_the_pod_through_32kib_buffers(stacks):
    gw = await aigw(stacks)
    prompt = "".join(chr(ord("a") + i % 26) for i in range(BIG_PROMPT_CHARS))
    status, headers, body = await gw.post({**COMPLETION, "prompt": prompt})
    assert status == 200, body[:300]
    (seen,) = gw.by_name(headers["x-served-by"]).seen
    assert orjson.loads(seen.body)["prompt"] == prompt  # all of it, in order, re-chunked by epp
    await gw.idle()
    assert gw.app.datastore.load.total_inflight() == 0


async def test_mirror_gets_each_request_once_and_the_client_only_the_primary(stacks):
    gw = await aigw(stacks, mirror=True)
    (shadow,) = gw.shadows
    shadow.status = 500
    for i in range(4):
        status, headers, _ = await gw.post({**COMPLETION, "prompt": f"copy {i}"})
        assert status == 200 and headers["x-served-by"].startswith("pod-")
    await wait_for_arrivals([shadow], 4)
    assert sorted(orjson.loads(s.body)["prompt"] for s in shadow.seen) == [f"copy {i}" for i in range(4)]
    assert all(s.headers["host"] == gw.url.removeprefix("http://") for s in shadow.seen)  # no -shadow suffix


async def test_no_metadata_either_way_subset_hint_and_served_endpoint_are_lost(stacks):
    """Without metadata_options Envoy forwards no subset hint to epp and keeps none of
    epp's envoy.lb keys (the fallback list), so no served endpoint comes back either."""
    gw = await aigw(stacks, conformance_test_hooks=True, mutate=lambda config, pods: insert_subset_hint(
        config, [pods[0].address]))
    hold = asyncio.Event()
    for pod in gw.pods:
        pod.hold = hold
    tasks = [asyncio.create_task(gw.post(COMPLETION))]
    await wait_for_arrivals(gw.pods, 1)
    tasks.append(asyncio.create_task(gw.post(COMPLETION)))
    await wait_for_arrivals(gw.pods, 2)
    hold.set()
    answers = [await asyncio.wait_for(t, 10) for t in tasks]
    assert [status for status, _, _ in answers] == [200, 200]
    assert {h["x-served-by"] for _, h, _ in answers} == {"pod-0", "pod-1"}  # the hint never reached epp
    assert all("x-conformance-test-served-endpoint" not in h for _, h, _ in answers)  # nothing served reported
    await gw.idle()
    assert gw.app.datastore.load.total_inflight() == 0
    log = await gw.access_log(2)
    assert len(log) == 2 and all("lbmd=-" in line for line in log)  # Envoy kept none of epp's envoy.lb keys


async def test_epp_down_fails_closed_even_for_a_failopen_pool(stacks):
    """failure_mode_allow is hard-coded false: a FailOpen pool fails closed too."""
    for mode in ("FailClose", "FailOpen"):
        gw = await aigw(stacks, failure_mode=mode)
        assert (await gw.post(COMPLETION))[0] == 200
        await gw.app.aclose()
        status, _, _ = await gw.post(COMPLETION)
        assert status == 500, mode
        async with gw.http.get(gw.url + "/v1/models") as r:  # body-less requests too
            assert r.status == 500, mode


async def test_a_plaintext_epp_breaks_behind_it(stacks):
    """TLS to epp is always on: epp must serve TLS (any certificate)."""
    gw = await aigw(stacks, tls=False)
    status, _, _ = await gw.post(COMPLETION)
    assert status == 500
    assert all(not p.seen for p in gw.pods)


def test_the_renderer_names_what_the_overlay_applies():
    """``overlays/envoy-ai-gateway``'s pool and epp Service give the names AI Gateway would
    render; the renderer's defaults produce the same ones."""
    docs = egctl.build("envoy-ai-gateway")
    (pool,) = [d for d in docs if d["kind"] == "InferencePool"]
    ref = pool["spec"]["endpointPickerRef"]
    name, ns, port = pool["metadata"]["name"], pool["metadata"]["namespace"], ref["port"]["number"]
    doc = pool_doc(["127.0.0.1:8000"], name=name, failure_mode=ref["failureMode"])
    doc["pool"]["namespace"] = ns
    boot = render_ai_gateway_bootstrap(parse_pool_file(yaml.safe_dump(doc)), listen_port=0,
                                       epp_address=f"127.0.0.1:{port}")  # epp_service left to its default
    ext_proc = _ext_proc(boot)
    assert ext_proc["name"] == f"envoy.filters.http.ext_proc/endpointpicker/{name}_{ns}_ext_proc"
    grpc = ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]
    assert grpc == {"cluster_name": f"envoy.clusters.endpointpicker_{name}_{ns}_ext_proc",
                    "authority": f"{ref['name']}.{ns}.svc:{port}"}
    assert [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == ref["name"]]
