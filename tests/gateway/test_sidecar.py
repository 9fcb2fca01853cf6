"""The sidecar shape as Envoy Gateway renders it: ``manifests/scenario/overlays/sidecar``.

epp runs in the Envoy pod (an EnvoyProxy patch adds its container and an ``emptyDir``
both mount); the EnvoyExtensionPolicy's target is an Envoy Gateway ``Backend`` with a
Unix-socket endpoint.  ``egctl`` renders it; the socket path becomes one in a temporary
directory, ``epp serve --grpc-address unix://…`` (a real process) listens there, and real
Envoy talks to it over the socket.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from epp.cli import build_parser

from .harness import BIG_PROMPT_CHARS, Stack, Stacks
from .scenario import EXTPROC_CLUSTER, HOST, LISTENER, MIRROR_CLUSTER, MODEL, REQUEST, ROUTE_CLUSTER
from .xds import Dump, static_bootstrap
from support import pool_doc, write_yaml
from support.serve import start_serve
from support.upstreams import wait_for_arrivals


@pytest.fixture(scope="module")
def sidecar_docs(renders) -> list[dict[str, Any]]:
    return renders.docs("sidecar")


@pytest.fixture(scope="module")
def sidecar(renders) -> Dump:
    return Dump(renders.dump("sidecar"))



def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _socket_path(docs: list[dict[str, Any]]) -> str:
    (endpoint,) = _one(docs, "Backend")["spec"]["endpoints"]
    return str(endpoint["unix"]["path"])


def test_the_proxy_pod_gets_epp_and_the_socket_volume_both_mount(sidecar_docs):
    path = _socket_path(sidecar_docs)
    deployment = _one(sidecar_docs, "EnvoyProxy")["spec"]["provider"]["kubernetes"]["envoyDeployment"]
    (volume,) = deployment["pod"]["volumes"]
    assert volume["emptyDir"] == {}
    (envoy_mount,) = deployment["container"]["volumeMounts"]
    (epp,) = deployment["patch"]["value"]["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in epp["volumeMounts"]}
    assert envoy_mount["name"] == volume["name"] and mounts[volume["name"]] == envoy_mount["mountPath"]
    assert path.startswith(envoy_mount["mountPath"].rstrip("/") + "/")
    args = build_parser().parse_args(epp["args"])
    assert args.command == "serve" and args.grpc_address == f"unix://{path}"
    policy = _one(sidecar_docs, "EnvoyExtensionPolicy")
    (ref,) = policy["spec"]["extProc"][0]["backendRefs"]
    assert (ref["group"], ref["kind"], ref["name"]) == (
        "gateway.envoyproxy.io", "Backend", _one(sidecar_docs, "Backend")["metadata"]["name"])


def test_egctl_renders_the_ext_proc_cluster_on_the_socket_in_plaintext(sidecar, sidecar_docs):
    cluster = sidecar.clusters[EXTPROC_CLUSTER]
    assert "transportSocket" not in cluster  # plaintext over the socket: the pod boundary is the trust boundary
    (lb,) = sidecar.endpoints[EXTPROC_CLUSTER]["endpoints"][0]["lbEndpoints"]
    assert lb["endpoint"]["address"] == {"pipe": {"path": _socket_path(sidecar_docs)}}


async def _inflight(http: aiohttp.ClientSession, metrics: str) -> float:
    async with http.get(f"http://{metrics}/metrics") as r:
        text = await r.text()
    samples = [ln for ln in text.splitlines() if ln.startswith("inference_pool_per_pod_inflight_requests{")]
    assert samples, "no per-pod in-flight series"
    return sum(float(ln.rpartition(" ")[2]) for ln in samples)


async def _until_no_inflight(http: aiohttp.ClientSession, metrics: str, timeout: float = 5.0) -> None:
    """epp's stream ends a moment after the client's answer; epp serve offers only its
    metrics endpoint to observe that, so poll it, bounded by ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            if await _inflight(http, metrics) == 0:
                return
            await asyncio.sleep(0.05)


async def test_requests_through_envoy_reach_epp_over_the_socket(stacks: Stacks, sidecar, socket_dir):
    sock = socket_dir / "epp.sock"
    pods = await stacks.pods(2)
    (shadow,) = await stacks.pods(1, prefix="shadow")
    models = [{"modelName": MODEL, "criticality": "Critical", "targetModels": [{"name": MODEL}]}]
    pool = write_yaml(stacks.path("pool.yaml"), pool_doc([p.address for p in pods], models=models,
                                                         name="vllm-llama2-7b-pool"))
    served = await start_serve(pool, "--grpc-address", f"unix://{sock}", "--max-body-bytes", "1Mi")
    stacks.own(served.kill)
    config = static_bootstrap(sidecar, {
        ROUTE_CLUSTER: [p.address for p in pods],
        MIRROR_CLUSTER: [shadow.address],
        EXTPROC_CLUSTER: [f"unix://{sock}"],
    })
    envoy, url = await stacks.envoy(config, LISTENER)
    gw = Stack(url, envoy, await stacks.session(), pods, [shadow], served=served, config=config)
    host = {"host": HOST}

    prompt = "".join(chr(ord("a") + i % 26) for i in range(BIG_PROMPT_CHARS))
    for i, doc in enumerate([REQUEST, {**REQUEST, "prompt": prompt}, {**REQUEST, "stream": True}]):
        status, headers, body = await gw.post(doc, headers=host)
        assert status == 200, body[:200]
        pod = gw.by_name(headers["x-served-by"])
        assert pod.seen[-1].headers["x-gateway-destination-endpoint"] == pod.address  # epp's pick, over the socket
        assert orjson.loads(pod.seen[-1].body)["prompt"] == doc["prompt"]
        await wait_for_arrivals([shadow], i + 1)  # mirrored once each
    assert body.endswith(b"data: [DONE]\n\n")
    for data, expected in [(b"{not json", 400), (orjson.dumps({**REQUEST, "model": "nope"}), 404),
                           (orjson.dumps({**REQUEST, "prompt": "y" * (2 << 20)}), 413)]:
        status, headers, body = await gw.post(data=data, headers=host)
        assert (status, headers["content-type"], orjson.loads(body)["error"]["code"]) == (
            expected, "application/json", expected)
    await _until_no_inflight(gw.http, served.address("metrics"))
    stats = await envoy.stats(r"cluster\.envoyextensionpolicy/default/epp/extproc/0\.upstream_cx_total")
    assert sum(stats.values()) >= 1
    assert len(shadow.seen) == 3

    assert await served.stop() == 0  # epp gone: the FailClose pool fails closed
    status, _, _ = await gw.post(REQUEST, headers=host)
    assert status == 500
