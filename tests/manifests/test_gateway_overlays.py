"""The gateway overlays' cross-references: ``envoy-gateway`` (seed-era, Envoy Gateway alone),
``sidecar`` and ``envoy-ai-gateway``; and every object's namespace.

egctl renders the first two and real Envoy runs them in tests/gateway; here the names a
typo would break are checked directly, with a message that says which.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml

from epp.cli import build_parser, settings_from

from .test_manifests import KUSTOMIZE_CLUSTER_SCOPED, ROOT, SCENARIO, kustomize

GATEWAY_OVERLAYS = ("envoy-gateway", "sidecar", "envoy-ai-gateway")
NOT_OBJECTS = {"Kustomization", "Component", "EnvoyGateway"}  # EnvoyGateway: controller config, not applied
CLUSTER_SCOPED = KUSTOMIZE_CLUSTER_SCOPED | {"GatewayClass"}


def _build(overlay: str) -> list[dict[str, Any]]:
    return kustomize(SCENARIO / "overlays" / overlay)


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _epp_args(container: dict[str, Any]) -> Any:
    return build_parser().parse_args(container["args"])


def test_every_object_in_every_file_states_its_namespace():
    """An object without one lands wherever it is applied from; an EnvoyPatchPolicy there
    targets nothing and Envoy Gateway silently never applies it."""
    objects = []
    for path in sorted(ROOT.rglob("*.yaml")):
        for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
            if "kind" in doc and doc["kind"] not in NOT_OBJECTS and "metadata" in doc:
                objects.append((path.relative_to(ROOT), doc))
    assert len(objects) > 20
    missing = [f"{p}: {d['kind']} {d['metadata']['name']}" for p, d in objects
               if d["kind"] not in CLUSTER_SCOPED and d["metadata"].get("namespace") != "default"]
    assert missing == []


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
@pytest.mark.parametrize("overlay", GATEWAY_OVERLAYS)
def test_real_kustomize_agrees_with_the_stand_in(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(SCENARIO / "overlays" / overlay)], check=False,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    real = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(real, key=key) == sorted(_build(overlay), key=key)


def test_envoy_gateway_overlay_wires_epp_the_seed_era_way():
    docs = _build("envoy-gateway")
    route = _one(docs, "HTTPRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    service = _one(docs, "Service", backend["name"])
    assert backend.get("kind", "Service") == "Service" and service["spec"].get("clusterIP") != "None"
    assert service["spec"]["selector"] == {"app": "vllm-llama2-7b-pool"}
    policy = _one(docs, "EnvoyExtensionPolicy")
    assert [(t["kind"], t["name"]) for t in policy["spec"]["targetRefs"]] == [("HTTPRoute", route["metadata"]["name"])]
    (ext_proc,) = policy["spec"]["extProc"]
    (ref,) = ext_proc["backendRefs"]
    epp_service = _one(docs, "Service", ref["name"])
    epp = _one(docs, "Deployment", "vllm-llama2-7b-pool-epp")
    (container,) = epp["spec"]["template"]["spec"]["containers"]
    port = next(p for p in epp_service["spec"]["ports"] if p["port"] == ref["port"])
    assert port["targetPort"] == _epp_args(container).grpc_port
    assert ext_proc["processingMode"]["request"]["body"] == "Buffered"
    # the buffer holds any body epp accepts, so an oversize one gets epp's JSON 413
    traffic = _one(docs, "ClientTrafficPolicy")
    limit = traffic["spec"]["connection"]["bufferLimit"]
    assert limit.endswith("Mi") and int(limit[:-2]) << 20 > settings_from(_epp_args(container), {}).max_body_bytes
    # the patch policy names the objects as Envoy Gateway names their xDS
    patch = _one(docs, "EnvoyPatchPolicy")
    names = [p["name"] for p in patch["spec"]["jsonPatches"]]
    gateway = _one(docs, "Gateway")
    ns = policy["metadata"]["namespace"]
    assert f"envoyextensionpolicy/{ns}/{policy['metadata']['name']}/extproc/0" in names
    assert f"{ns}/{gateway['metadata']['name']}/{gateway['spec']['listeners'][0]['name']}" in names


def test_sidecar_overlay_runs_epp_in_the_proxy_pod():
    docs = _build("sidecar")
    assert not [d for d in docs if d["metadata"]["name"] == "vllm-llama2-7b-pool-epp"
                and d["kind"] in ("Deployment", "Service")]  # the stand-alone epp is gone
    backend = _one(docs, "Backend")
    (endpoint,) = backend["spec"]["endpoints"]
    path = endpoint["unix"]["path"]
    assert len(path) <= 108
    provider = _one(docs, "EnvoyProxy")["spec"]["provider"]["kubernetes"]
    template = provider["envoyDeployment"]["patch"]["value"]["spec"]["template"]["spec"]
    (container,) = template["containers"]
    args = _epp_args(container)
    assert args.grpc_address == f"unix://{path}" and args.pool_name == "vllm-llama2-7b-pool"
    assert args.pool_namespace == "default"  # the proxy runs in Envoy Gateway's namespace
    pool = _one(docs, "InferencePool")
    assert args.pool_group == pool["apiVersion"].partition("/")[0]
    assert template["automountServiceAccountToken"] is True
    binding = _one(docs, "RoleBinding", "vllm-llama2-7b-pool-epp-sidecar")
    _one(docs, "Role", binding["roleRef"]["name"])
    (subject,) = binding["subjects"]
    assert subject["name"] == provider["envoyServiceAccount"]["name"]
    patch = _one(docs, "EnvoyPatchPolicy")
    assert all(p["operation"]["path"] != "/transport_socket" for p in patch["spec"]["jsonPatches"])


def test_envoy_ai_gateway_overlay_registers_the_pool_version_it_applies():
    docs = _build("envoy-ai-gateway")
    pool = _one(docs, "InferencePool")
    group, _, version = pool["apiVersion"].partition("/")
    values = yaml.safe_load((SCENARIO / "overlays" / "envoy-ai-gateway" / "envoy-gateway-values.yaml").read_text())
    manager = values["config"]["envoyGateway"]["extensionManager"]
    # EG matches by group, kind and version; AI Gateway >= v0.4 reads only v1
    assert manager["backendResources"] == [{"group": group, "kind": "InferencePool", "version": version}] and (
        version == "v1")
    assert set(manager["hooks"]["xdsTranslator"]["post"]) == {"Translation", "Cluster", "Route"}
    assert pool["metadata"]["annotations"] == {"aigateway.envoyproxy.io/processing-body-mode": "duplex"}
    ref = pool["spec"]["endpointPickerRef"]
    epp = _one(docs, "Deployment", "vllm-llama2-7b-pool-epp")
    (container,) = epp["spec"]["template"]["spec"]["containers"]
    args = _epp_args(container)
    assert args.secure_serving is True  # AI Gateway always dials epp over TLS
    service = _one(docs, "Service", ref["name"])
    assert next(p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"])["targetPort"] == (
        args.grpc_port)
