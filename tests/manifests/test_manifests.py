"""Parse every manifest and check the cross-references a typo would break."""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from epp.cli import build_parser
from epp.config import PoolFile, parse_pool_file
from epp.wire import MIRROR_HEADER

ROOT = Path(__file__).resolve().parents[2] / "manifests"


def load_all() -> list[dict]:
    docs = []
    for path in sorted(ROOT.rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_every_manifest_parses_and_has_kind():
    docs = load_all()
    assert docs and all("kind" in d or "pool" in d for d in docs)


def test_epp_base_is_consistent():
    base = ROOT / "epp"
    kust = yaml.safe_load((base / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (base / res).is_file(), res
    pool_cm = kust["configMapGenerator"][0]
    pool = parse_pool_file((base / pool_cm["files"][0]).read_text(), "pool.yaml")
    assert pool.pool.name
    dep = yaml.safe_load((base / "deployment.yaml").read_text())
    svc = yaml.safe_load((base / "service.yaml").read_text())
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    ports = {p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    args = build_parser().parse_args(container["args"])  # the args are ones epp accepts
    assert {args.grpc_port, args.grpc_health_port, args.metrics_port} == ports
    assert container["readinessProbe"]["grpc"]["port"] == args.grpc_health_port
    mount = container["volumeMounts"][0]
    assert args.pool_file.startswith(mount["mountPath"] + "/")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == pool_cm["name"]
    assert 9002 in {p["port"] for p in svc["spec"]["ports"]}


# --- the traffic-mirroring scenario (manifests/scenario) ----------------------------------
#
# The overlays are built by a small stand-in for `kustomize build` that knows exactly the
# features these manifests use (resources, configMapGenerator with create/replace/merge,
# inline JSON6902 patches, namespace). When kubectl is installed its real kustomize builds
# the same overlays and the two results must agree, so the stand-in cannot drift.

SCENARIO = ROOT / "scenario"
OVERLAYS = ("v1alpha2", "v1", "load-aware-mirror")
PRIMARY, SHADOW, EPP = "vllm-llama2-7b-pool", "vllm-llama2-7b-pool-1", "vllm-llama2-7b-pool-epp"
POOL_GROUPS = {"v1alpha2": "inference.networking.x-k8s.io", "v1": "inference.networking.k8s.io"}
# Kinds kustomize's namespace transformer leaves alone (the ones these manifests could use).
KUSTOMIZE_CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "Namespace", "CustomResourceDefinition"}
TRULY_CLUSTER_SCOPED = KUSTOMIZE_CLUSTER_SCOPED | {"GatewayClass"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pointer(doc: Any, path: str) -> tuple[Any, str | int]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    last = parts[-1]
    return doc, (int(last) if isinstance(doc, list) and last != "-" else last)


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add/replace/remove, enough for kustomize patches and EnvoyPatchPolicy."""
    for op in ops:
        parent, key = _pointer(doc, op["path"])
        if op["op"] == "replace":
            assert key in parent if isinstance(parent, dict) else key < len(parent), op["path"]
            parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if key == "-" else key, copy.deepcopy(op["value"]))
            else:
                parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[key]
        else:
            raise AssertionError(f"unsupported patch op {op['op']}")


def _target_matches(doc: dict[str, Any], target: dict[str, str]) -> bool:
    group = doc["apiVersion"].rpartition("/")[0]
    return (
        target.get("kind", doc["kind"]) == doc["kind"]
        and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
        and target.get("group", group) == group
    )


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    assert set(kust) <= {
        "apiVersion",
        "kind",
        "namespace",
        "resources",
        "configMapGenerator",
        "generatorOptions",
        "patches",
    }, f"{directory}: feature the test does not model"
    docs: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        path = directory / entry
        assert path.exists(), f"{directory}/kustomization.yaml: resource {entry} does not exist"
        docs += kustomize(path) if path.is_dir() else _docs(path)
    if kust.get("configMapGenerator"):
        # Names stay stable, so volumes and the pool-file reload work without a hash suffix.
        assert kust["generatorOptions"]["disableNameSuffixHash"] is True
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for spec in gen.get("files", []):
            key, _, rel = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
            assert (directory / rel).is_file(), f"{directory}: generator file {rel} does not exist"
            data[key] = (directory / rel).read_text()
        data.update(lit.split("=", 1) for lit in gen.get("literals", []))
        same = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == gen["name"]]
        behavior = gen.get("behavior", "create")
        if behavior == "create":
            assert not same, f"ConfigMap {gen['name']} generated twice"
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
        else:
            assert len(same) == 1, f"{directory}: {behavior} of unknown ConfigMap {gen['name']}"
            same[0]["data"] = data if behavior == "replace" else {**same[0].get("data", {}), **data}
    for patch in kust.get("patches", []):
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text())
        hits = [d for d in docs if _target_matches(d, patch["target"])]
        assert hits, f"{directory}: patch target {patch['target']} matches nothing"
        for doc in hits:
            json_patch(doc, ops)
    if namespace := kust.get("namespace"):
        for doc in docs:
            if doc["kind"] not in KUSTOMIZE_CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
            for subject in doc.get("subjects", []) if doc["kind"].endswith("RoleBinding") else []:
                if subject.get("kind") == "ServiceAccount" and subject.get("namespace") == "default":
                    subject["namespace"] = namespace
    return docs


class Built:
    """One built overlay, with lookups by kind and name."""

    def __init__(self, overlay: str) -> None:
        self.overlay = overlay
        self.docs = kustomize(SCENARIO / "overlays" / overlay)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.overlay}: expected one {kind} {name}, found {len(found)}"
        return found[0]

    def pool_version(self) -> str:
        return "v1" if self.overlay == "load-aware-mirror" else self.overlay


@pytest.fixture(scope="module", params=OVERLAYS)
def built(request: pytest.FixtureRequest) -> Built:
    return Built(request.param)


def _pods(built: Built, selector: dict[str, str]) -> list[dict[str, Any]]:
    return [
        d["spec"]["template"]
        for d in built.all("Deployment")
        if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]


def _container_ports(pod: dict[str, Any]) -> dict[str | int, int]:
    """containerPort by number and by name."""
    out: dict[str | int, int] = {}
    for c in pod["spec"]["containers"]:
        for p in c.get("ports", []):
            out[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                out[p["name"]] = p["containerPort"]
    return out


def _service_port_to(built: Built, service: str, port: int) -> int:
    """The container port a Service port forwards to."""
    svc = built.get("Service", service)
    sport = next(p for p in svc["spec"]["ports"] if p["port"] == port)
    (pod,) = _pods(built, svc["spec"]["selector"])
    return _container_ports(pod)[sport.get("targetPort", sport["port"])]


def _epp(built: Built) -> tuple[dict[str, Any], argparse.Namespace]:
    pod = built.get("Deployment", EPP)["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return pod, build_parser().parse_args(container["args"])


def _epp_pool_file(built: Built) -> PoolFile:
    pod, args = _epp(built)
    (container,) = pod["spec"]["containers"]
    mount = next(m for m in container["volumeMounts"] if args.pool_file.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    cm = built.get("ConfigMap", volume["configMap"]["name"])
    key = args.pool_file[len(mount["mountPath"].rstrip("/")) + 1 :]
    assert key in cm["data"], f"{args.pool_file} is not a key of ConfigMap {cm['metadata']['name']}"
    return parse_pool_file(cm["data"][key], f"{built.overlay}: {key}")


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_every_yaml_file_under_manifests_parses():
    files = sorted([*ROOT.rglob("*.yaml"), *ROOT.rglob("*.yml")])
    assert len(files) >= 15
    for path in files:
        for doc in _docs(path):
            assert isinstance(doc, dict), path


def test_every_kustomization_builds_with_its_resources_present():
    kustomizations = sorted(p.parent for p in ROOT.rglob("kustomization.yaml"))
    assert {SCENARIO / "base", ROOT / "epp", *(SCENARIO / "overlays" / o for o in OVERLAYS)} <= set(kustomizations)
    for directory in kustomizations:
        assert kustomize(directory), directory


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_real_kustomize_agrees_with_the_stand_in(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(SCENARIO / "overlays" / overlay)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    assert sorted(_docs_from(out.stdout), key=key) == sorted(kustomize(SCENARIO / "overlays" / overlay), key=key)


def _docs_from(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_objects_are_unique_and_share_the_gateway_namespace(built):
    keys = [(d["kind"], d["metadata"]["name"]) for d in built.docs]
    assert keys and len(keys) == len(set(keys))
    for doc in built.docs:
        if doc["kind"] not in TRULY_CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == "default", doc["kind"]


def test_deployment_selectors_match_their_pod_labels(built):
    assert {d["metadata"]["name"] for d in built.all("Deployment")} == {PRIMARY, SHADOW, EPP, "sleep"}
    for dep in built.all("Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), dep["metadata"]["name"]
        # ...and no other Deployment's pods carry them (one owner per pod).
        assert len(_pods(built, dep["spec"]["selector"]["matchLabels"])) == 1


def test_services_select_pods_and_target_their_container_ports(built):
    assert {s["metadata"]["name"] for s in built.all("Service")} >= {EPP, SHADOW}
    for svc in built.all("Service"):
        pods = _pods(built, svc["spec"]["selector"])
        assert len(pods) == 1, svc["metadata"]["name"]
        ports = _container_ports(pods[0])
        for p in svc["spec"]["ports"]:
            assert p.get("targetPort", p["port"]) in ports, (svc["metadata"]["name"], p)


def test_workloads_run_as_existing_service_accounts(built):
    accounts = {d["metadata"]["name"] for d in built.all("ServiceAccount")}
    for dep in built.all("Deployment"):
        account = dep["spec"]["template"]["spec"].get("serviceAccountName")
        assert account is None or account in accounts, dep["metadata"]["name"]
    assert built.get("Deployment", EPP)["spec"]["template"]["spec"]["serviceAccountName"] == EPP


def test_epp_rolebinding_ties_its_role_to_its_service_account(built):
    binding = built.get("RoleBinding", EPP)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": EPP}
    role = built.get("Role", binding["roleRef"]["name"])
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": EPP, "namespace": "default"}]
    built.get("ServiceAccount", EPP)
    # Read-only: what Kubernetes discovery will need, nothing that writes.
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert verbs == {"get", "list", "watch"}
    pools = {g for rule in role["rules"] if "inferencepools" in rule["resources"] for g in rule["apiGroups"]}
    assert set(POOL_GROUPS.values()) <= pools


def test_configmap_volumes_exist_and_chat_template_is_mounted(built):
    for dep in built.all("Deployment"):
        for volume in dep["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in volume:
                built.get("ConfigMap", volume["configMap"]["name"])
    for name in (PRIMARY, SHADOW):
        (container,) = built.get("Deployment", name)["spec"]["template"]["spec"]["containers"]
        template_path = container["args"][container["args"].index("--chat-template") + 1]
        mount = next(m for m in container["volumeMounts"] if template_path.startswith(m["mountPath"] + "/"))
        pod_volumes = built.get("Deployment", name)["spec"]["template"]["spec"]["volumes"]
        volume = next(v for v in pod_volumes if v["name"] == mount["name"])
        assert template_path.rpartition("/")[2] in built.get("ConfigMap", volume["configMap"]["name"])["data"]


def test_the_two_vllm_deployments_differ_only_in_their_names(built):
    primary = built.get("Deployment", PRIMARY)
    shadow = yaml.safe_load(yaml.safe_dump(built.get("Deployment", SHADOW)).replace(SHADOW, PRIMARY))
    assert shadow == primary


def test_vllm_deployment_is_the_scenarios(built):
    pod = built.get("Deployment", PRIMARY)["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["image"] == "registry-cn-hangzhou.ack.aliyuncs.com/ack-demo/llama2-with-lora:v0.2"
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    args = c["args"]
    assert args[args.index("--model") + 1] == "/model/llama2"
    port = int(args[args.index("--port") + 1])
    assert _container_ports(pod)["http"] == port == 8000
    assert "--enable-lora" in args and args[args.index("--max-loras") + 1] == "4"
    start = args.index("--lora-modules") + 1
    modules = dict(a.split("=", 1) for a in args[start : start + 10])
    suffixes = ("", "-1", "-2", "-3", "-4")
    assert sorted(modules) == sorted([f"sql-lora{s}" for s in suffixes] + [f"tweet-summary{s}" for s in suffixes])
    assert all(path.startswith("/adapters/") for path in modules.values())
    for res in ("requests", "limits"):
        assert c["resources"][res]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and _container_ports(pod)[get["port"]] == port, probe
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"


def test_chat_template_renders_llama2_prompts():
    jinja2 = pytest.importorskip("jinja2.sandbox")
    env = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    template = env.from_string((SCENARIO / "base" / "llama-2-chat.jinja").read_text())
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    one = template.render(messages=[{"role": "user", "content": "introduce yourself"}], **tokens)
    assert one == "<s>[INST] introduce yourself [/INST]"
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    assert template.render(messages=chat, **tokens) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST] hello </s><s>[INST] again [/INST]"
    )
    with pytest.raises(ValueError):
        template.render(messages=[{"role": "tool", "content": "x"}], **tokens)


def test_inference_pool_selects_the_primary_pods_on_the_vllm_port(built):
    (pool,) = built.all("InferencePool")
    version = built.pool_version()
    assert pool["apiVersion"] == f"{POOL_GROUPS[version]}/{version}"
    assert pool["metadata"]["name"] == PRIMARY
    spec = pool["spec"]
    if version == "v1alpha2":
        selector, ports = spec["selector"], [spec["targetPortNumber"]]
    else:
        selector, ports = spec["selector"]["matchLabels"], [p["number"] for p in spec["targetPorts"]]
    pods = _pods(built, selector)
    assert [p["metadata"]["labels"]["app"] for p in pods] == [PRIMARY]
    assert ports == [_container_ports(pods[0])["http"]]


def test_inference_pool_calls_epps_ext_proc_port(built):
    (pool,) = built.all("InferencePool")
    if built.pool_version() == "v1alpha2":
        ref = pool["spec"]["extensionRef"]
        port = ref.get("portNumber", 9002)  # implementations assume 9002 when unset
    else:
        ref = pool["spec"]["endpointPickerRef"]
        port = ref["port"]["number"]
    assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
    assert ref["name"] == EPP
    _, args = _epp(built)
    assert _service_port_to(built, ref["name"], port) == args.grpc_port == 9002
    # The gateway's failure mode and epp's own agree.
    assert ref.get("failureMode", "FailClose") == _epp_pool_file(built).pool.failure_mode


def test_inference_model_points_at_the_pool_and_matches_epps_policy(built):
    models = built.all("InferenceModel")
    policy = {m.model_name: m for m in _epp_pool_file(built).models or []}
    assert list(policy) == ["/model/llama2"]
    if built.pool_version() == "v1":
        assert models == []  # v1 has no InferenceModel; the pool file carries the policy
        return
    (model,) = models
    spec = model["spec"]
    assert spec["poolRef"] == {"group": POOL_GROUPS["v1alpha2"], "kind": "InferencePool", "name": PRIMARY}
    built.get("InferencePool", spec["poolRef"]["name"])
    assert (spec["modelName"], spec["criticality"]) == ("/model/llama2", "Critical")
    assert spec["targetModels"] == [{"name": "/model/llama2", "weight": 100}]
    mine = policy[spec["modelName"]]
    assert mine.criticality.value == spec["criticality"]
    assert [(t.name, t.weight) for t in mine.target_models] == [(t["name"], t["weight"]) for t in spec["targetModels"]]


def test_gateway_class_and_proxy_parameters_exist(built):
    (gateway,) = built.all("Gateway")
    assert gateway["metadata"]["name"] == "example-gateway"
    gw_class = built.get("GatewayClass", gateway["spec"]["gatewayClassName"])
    assert gw_class["spec"]["controllerName"] == "gateway.envoyproxy.io/gatewayclass-controller"
    refs = [
        r
        for r in (gw_class["spec"].get("parametersRef"), gateway["spec"].get("infrastructure", {}).get("parametersRef"))
        if r
    ]
    assert refs, "no EnvoyProxy referenced"
    for ref in refs:
        assert (ref["group"], ref["kind"]) == ("gateway.envoyproxy.io", "EnvoyProxy")
        proxy = built.get("EnvoyProxy", ref["name"])
    assert proxy["spec"]["provider"]["kubernetes"]["envoyService"]["type"] == "ClusterIP"
    assert [(lis["protocol"], lis["port"]) for lis in gateway["spec"]["listeners"]] == [("HTTP", 80)]


def test_httproute_sends_to_the_pool_and_mirrors_to_the_shadow_service(built):
    (route,) = built.all("HTTPRoute")
    (gateway,) = built.all("Gateway")
    assert [p["name"] for p in route["spec"]["parentRefs"]] == [gateway["metadata"]["name"]]
    listener_ns = gateway["spec"]["listeners"][0]["allowedRoutes"]["namespaces"]["from"]
    assert listener_ns == "Same" and route["metadata"]["namespace"] == gateway["metadata"]["namespace"]
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    (pool,) = built.all("InferencePool")
    assert (backend["group"], backend["kind"], backend["name"]) == (
        pool["apiVersion"].partition("/")[0],
        "InferencePool",
        pool["metadata"]["name"],
    )
    mirrors = [f for f in rule["filters"] if f["type"] == "RequestMirror"]
    assert len(mirrors) == 1
    ref = mirrors[0]["requestMirror"]["backendRef"]
    assert ref.get("kind", "Service") == "Service" and ref["name"] == SHADOW
    shadow_port = _container_ports(_pods(built, {"app": SHADOW})[0])["http"]
    assert _service_port_to(built, ref["name"], ref["port"]) == shadow_port


def test_epp_args_parse_and_its_pool_file_is_the_scenarios(built):
    pod, args = _epp(built)
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "ghcr.io/epp-project/epp:0.1.0"
    assert args.command == "serve"
    ports = {p["containerPort"] for p in container["ports"]}
    assert {args.grpc_port, args.grpc_health_port, args.metrics_port} == ports
    pool_file = _epp_pool_file(built)
    assert pool_file.pool.name == built.all("InferencePool")[0]["metadata"]["name"]
    assert pool_file.pool.engine == "vllm"
    vllm_port = _container_ports(_pods(built, {"app": PRIMARY})[0])["http"]
    assert pool_file.pool.endpoints and {_port(e.address) for e in pool_file.pool.endpoint_list()} == {vllm_port}
    if built.overlay == "load-aware-mirror":
        assert pool_file.mirror is not None and pool_file.mirror.name == SHADOW
        assert {_port(e.address) for e in pool_file.mirror.endpoint_list()} == {vllm_port}
    else:
        assert pool_file.mirror is None  # plain mirroring: epp knows nothing of the shadow


def _mirror_cluster_name(built: Built) -> str:
    """Envoy Gateway's name for a RequestMirror target's cluster (see envoy-patch-policy.yaml)."""
    (route,) = built.all("HTTPRoute")
    for i, rule in enumerate(route["spec"]["rules"]):
        for j, f in enumerate(rule.get("filters", [])):
            if f["type"] == "RequestMirror":
                return f"httproute/{route['metadata']['namespace']}/{route['metadata']['name']}/rule/{i}-mirror-{j}"
    raise AssertionError("no RequestMirror filter")


def test_load_aware_mirror_patches_the_mirror_cluster_with_override_host():
    built = Built("load-aware-mirror")
    (policy,) = built.all("EnvoyPatchPolicy")
    assert policy["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    spec = policy["spec"]
    (gateway,) = built.all("Gateway")
    assert spec["targetRef"] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": gateway["metadata"]["name"],
    }
    assert policy["metadata"]["namespace"] == gateway["metadata"]["namespace"]
    assert spec["type"] == "JSONPatch"
    cluster_name = _mirror_cluster_name(built)
    for patch in spec["jsonPatches"]:
        assert patch["type"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        assert patch["name"] == cluster_name
    # Apply the patches to a cluster shaped like the ones EG generates (older releases:
    # locality config in common_lb_config; newer: a least_request load_balancing_policy).
    cluster: dict[str, Any] = {
        "name": cluster_name,
        "type": "EDS",
        "lb_policy": "LEAST_REQUEST",
        "common_lb_config": {"locality_weighted_lb_config": {}},
        "load_balancing_policy": {
            "policies": [{"typed_extension_config": {"name": "envoy.load_balancing_policies.least_request"}}]
        },
    }
    json_patch(cluster, [p["operation"] for p in spec["jsonPatches"]])
    assert "locality_weighted_lb_config" not in cluster["common_lb_config"]
    (policy_entry,) = cluster["load_balancing_policy"]["policies"]
    ext = policy_entry["typed_extension_config"]
    assert ext["name"] == "envoy.load_balancing_policies.override_host"
    config = ext["typed_config"]
    assert config["@type"].endswith("override_host.v3.OverrideHost")
    assert config["override_host_sources"] == [{"header": MIRROR_HEADER}]
    (fallback,) = config["fallback_policy"]["policies"]
    assert fallback["typed_extension_config"]["name"] == "envoy.load_balancing_policies.round_robin"


def test_envoy_gateway_setting_for_patch_policies_is_documented_not_applied():
    overlay = SCENARIO / "overlays" / "load-aware-mirror"
    (fragment,) = _docs(overlay / "envoy-gateway-config.yaml")
    assert fragment["kind"] == "EnvoyGateway"
    assert fragment["extensionApis"]["enableEnvoyPatchPolicy"] is True
    # It is a fragment of the controller's config, not an object to apply with the overlay.
    assert "envoy-gateway-config.yaml" not in yaml.safe_load((overlay / "kustomization.yaml").read_text())["resources"]
    assert not Built("load-aware-mirror").all("EnvoyGateway")
