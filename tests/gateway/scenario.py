"""The scenario's names as Envoy Gateway renders them, and one stack on an egctl render.

``start(stacks, dump, docs)``: pods (and shadow pods) on loopback addresses, epp
in-process (TLS, as the seed-era patch policy dials it), and real Envoy on the dump's
static bootstrap with every endpoint replaced by those loopback ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import yaml

from epp.config import load_pool_file, parse_pool_file
from epp.envoy.ai_gateway import render_ai_gateway_bootstrap
from epp.envoy.config import BodyMode, LbMode, render_bootstrap

from . import egctl
from .harness import Pod, Stack, Stacks
from .xds import Dump, static_bootstrap
from support import MODELS, pool_doc, write_yaml

SEED = "envoy-gateway"
MIRROR_OVERLAY = "load-aware-mirror"
LISTENER = "default/example-gateway/http"
HOST = "example.com"  # the HTTPRoute's hostname: Envoy's virtual host matches on it
ROUTE_CLUSTER = "httproute/default/mirror-route/rule/0"
MIRROR_CLUSTER = "httproute/default/mirror-route/rule/0-mirror-0"
EXTPROC_CLUSTER = "envoyextensionpolicy/default/epp/extproc/0"
MODEL = "/model/llama2"  # the scenario's model (epp's pool file and the InferenceModel)
REQUEST = {"model": MODEL, "prompt": "Say hello", "max_tokens": 3}
LABELS = {"model_name": MODEL, "target_model_name": MODEL}


SIDECAR = "sidecar"


def mirror_patch() -> dict[str, Any]:
    """load-aware-mirror's EnvoyPatchPolicy as its file has it (``kubectl apply -f`` alone)."""
    text = (egctl.OVERLAYS / MIRROR_OVERLAY / "envoy-patch-policy.yaml").read_text()
    (doc,) = [d for d in yaml.safe_load_all(text) if d]
    return dict(doc)


def _without_namespace(doc: dict[str, Any]) -> dict[str, Any]:
    assert doc["metadata"]["namespace"] == "default"  # the file states it
    del doc["metadata"]["namespace"]
    return doc


def _fail_open(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a FailOpen pool's owner applies: the pool and the extension policy both fail open."""
    (pool,) = [d for d in docs if d["kind"] == "InferencePool"]
    (pool["spec"].get("endpointPickerRef") or pool["spec"]["extensionRef"])["failureMode"] = "FailOpen"
    (policy,) = [d for d in docs if d["kind"] == "EnvoyExtensionPolicy"]
    policy["spec"]["extProc"][0]["failOpen"] = True
    return docs


# Every egctl render the gateway tests use, started together once per session (conftest).
VARIANTS = {
    "seed": lambda: egctl.build(SEED),
    "load-aware": lambda: [*egctl.build(SEED), mirror_patch()],
    "patch-without-namespace": lambda: [*egctl.build(SEED), _without_namespace(mirror_patch())],
    "load-aware-mirror-overlay": lambda: egctl.build(MIRROR_OVERLAY),
    "default-buffer": lambda: [d for d in egctl.build(SEED) if d["kind"] != "ClientTrafficPolicy"],
    "fail-open": lambda: _fail_open(egctl.build(SEED)),
    "sidecar": lambda: egctl.build(SIDECAR),
}


def _epp_pool(docs: list[dict[str, Any]], pods: Sequence[str], shadows: Sequence[str] | None) -> dict[str, Any]:
    """epp's pool file for the overlay's InferencePool (name, failure mode) and model, with
    the test's pods (and shadow pods for load-aware mirroring) where the cluster has pod IPs."""
    (pool,) = [d for d in docs if d["kind"] == "InferencePool"]
    ref = pool["spec"].get("endpointPickerRef") or pool["spec"]["extensionRef"]
    doc = pool_doc(pods, name=pool["metadata"]["name"], failure_mode=ref.get("failureMode", "FailClose"),
                   models=[{"modelName": MODEL, "criticality": "Critical", "targetModels": [{"name": MODEL}]}])
    if shadows is not None:
        doc["mirror"] = {"name": "vllm-llama2-7b-pool-1", "endpoints": list(shadows)}
    parse_pool_file(yaml.safe_dump(doc))  # a pool file epp accepts
    return doc


async def start(
    stacks: Stacks,
    dump: Dump,
    docs: list[dict[str, Any]],
    *,
    shadows: int = 1,
    mirror_in_epp: bool = False,
    hosts: list[str] | None = None,
    pods: list[Pod] | None = None,
    **overrides: Any,
) -> Stack:
    """Pods + shadow pods + epp (TLS, as the patch policy dials it) + Envoy on the render."""
    if pods is None:
        pods = await stacks.pods(len(hosts) if hosts else 2, hosts=hosts)
    shadow_pods = await stacks.pods(shadows, prefix="shadow")
    doc = _epp_pool(docs, [p.address for p in pods], [s.address for s in shadow_pods] if mirror_in_epp else None)
    pool = write_yaml(stacks.path("pool.yaml"), doc)
    app = await stacks.app(pool, secure_serving=True, **overrides)
    config = static_bootstrap(dump, {
        ROUTE_CLUSTER: [p.address for p in pods],  # the Service's own cluster; the route no longer uses it
        MIRROR_CLUSTER: [s.address for s in shadow_pods],
        EXTPROC_CLUSTER: [f"127.0.0.1:{app.grpc_port}"],
    })
    envoy, url = await stacks.envoy(config, LISTENER)
    return Stack(url, envoy, await stacks.session(), pods, shadow_pods, app=app, config=config, host=HOST)


async def post(gw: Stack, doc: Any = None, *, data: bytes | None = None, headers: dict[str, str] | None = None):
    return await gw.post(doc, data=data, headers=headers)


async def start_ai_gateway(
    stacks: Stacks,
    *,
    n: int = 2,
    pods: list[Pod] | None = None,
    tls: bool = True,
    failure_mode: str = "FailClose",
    mirror: bool = False,
    models: list[dict[str, Any]] | None = None,
    mutate: Callable[[dict[str, Any], list[Pod]], None] | None = None,
    name: str = "test-pool",
    **overrides: Any,
) -> Stack:
    """Pods + epp (TLS) + Envoy on ``epp envoy-config --wiring envoy-ai-gateway``'s bootstrap."""
    if pods is None:
        pods = await stacks.pods(n)
    shadows = await stacks.pods(1, prefix="shadow") if mirror else []
    doc = pool_doc([p.address for p in pods], models=MODELS if models is None else models, name=name,
                   failure_mode=failure_mode, mirror=[s.address for s in shadows] if mirror else None)
    pool = write_yaml(stacks.path("pool.yaml"), doc)
    app = await stacks.app(pool, secure_serving=tls, **overrides)
    config = render_ai_gateway_bootstrap(load_pool_file(pool), listen_port=0, epp_address=f"127.0.0.1:{app.grpc_port}")
    if mutate is not None:
        mutate(config, pods)
    envoy, url = await stacks.envoy(config)
    return Stack(url, envoy, await stacks.session(), pods, shadows, app=app, config=config)


async def start_epp_wiring(
    stacks: Stacks,
    *,
    pods: list[Pod],
    body_mode: BodyMode = "full-duplex",
    lb: LbMode = "override-host",
    failure_mode: str = "FailClose",
    models: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> Stack:
    """Pods + epp + Envoy on ``epp envoy-config``'s own bootstrap (override_host by default)."""
    doc = pool_doc([p.address for p in pods], models=MODELS if models is None else models, failure_mode=failure_mode)
    pool = write_yaml(stacks.path("pool.yaml"), doc)
    app = await stacks.app(pool, **overrides)
    config = render_bootstrap(load_pool_file(pool), listen_port=0, epp_address=f"127.0.0.1:{app.grpc_port}",
                              body_mode=body_mode, lb=lb)
    envoy, url = await stacks.envoy(config)
    return Stack(url, envoy, await stacks.session(), pods, app=app, config=config)


