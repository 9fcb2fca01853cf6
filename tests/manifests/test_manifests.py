"""Parse every manifest and check the cross-references a typo would break."""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from epp.cli import build_parser, settings_from
from epp.config import PoolFile, Settings, parse_pool_file
from epp.discovery.kubernetes import POOL_VERSIONS, parse_pool, policies_of
from epp.domain import Criticality, ModelPolicy, TargetModel
from epp.wire import MIRROR_HEADER

from support import EPP_RBAC_RULES

ROOT = Path(__file__).resolve().parents[2] / "manifests"
PRIMARY, SHADOW, EPP = "vllm-llama2-7b-pool", "vllm-llama2-7b-pool-1", "vllm-llama2-7b-pool-epp"
EPP_DIRS = {"base": ROOT / "epp", "static-file": ROOT / "epp-overlays" / "static-file",
            "ha": ROOT / "epp-overlays" / "ha"}
EPP_RULES = EPP_RBAC_RULES


def load_all() -> list[dict]:
    docs = []
    for path in sorted(ROOT.rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_every_manifest_parses_and_has_kind():
    docs = load_all()
    assert docs and all("kind" in d or "pool" in d or _helm_values(d) for d in docs)


def _helm_values(doc: dict[str, Any]) -> bool:
    """Helm values for Envoy Gateway's chart (overlays/envoy-ai-gateway), not a cluster object."""
    return set(doc) == {"config"} and set(doc["config"]) == {"envoyGateway"}


def _epp_container(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (dep,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == EPP]
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return pod, container


def epp_settings(docs: list[dict[str, Any]], namespace: str = "default") -> tuple[argparse.Namespace, Settings]:
    """epp's parsed arguments and its Settings as the pod would get them: ``$(VAR)`` references in
    the args expanded from the container's env (as the kubelet does), the env given to epp."""
    _, container = _epp_container(docs)
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:  # the downward API: only the pod's namespace is used here
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, var
            env[var["name"]] = namespace
    def expand(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"epp's args use {match.group(0)}, which its env does not define"
        return env[match.group(1)]

    parsed = build_parser().parse_args([re.sub(r"\$\((\w+)\)", expand, arg) for arg in container["args"]])
    return parsed, settings_from(parsed, env)


def test_epp_base_follows_its_pool_through_the_api_server():
    base = ROOT / "epp"
    kust = yaml.safe_load((base / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (base / res).is_file(), res
    docs = kustomize(base)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    pod, container = _epp_container(docs)
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    args, settings = epp_settings(docs, namespace="team-a")
    assert args.pool_file is None and settings.pool_name == PRIMARY
    assert settings.pool_namespace == "team-a"  # the pod's own namespace, from the downward API
    assert settings.pool_group == "inference.networking.k8s.io"  # v1 unless an overlay says otherwise
    assert settings.kubeconfig is None and not settings.ha_enable_leader_election  # in-cluster config
    assert {args.grpc_port, args.grpc_health_port, args.metrics_port} == ports
    assert container["readinessProbe"]["grpc"]["port"] == args.grpc_health_port
    assert container["livenessProbe"]["grpc"] == {"port": args.grpc_health_port, "service": "liveness"}
    assert "volumes" not in pod["spec"] and "volumeMounts" not in container  # no pool file
    assert pod["spec"].get("automountServiceAccountToken", True)  # it needs its token
    assert 9002 in {p["port"] for p in svc["spec"]["ports"]}


def _role_rules(docs: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    (role,) = [d for d in docs if d["kind"] == "Role"]
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames, no wildcards
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def test_epp_role_is_exactly_the_least_privilege():
    docs = kustomize(ROOT / "epp")
    assert _role_rules(docs) == EPP_RULES
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]  # its namespace only
    # Every pool group epp can be told to follow is readable.
    assert {(g, "inferencepools") for g in POOL_VERSIONS} <= set(EPP_RULES)


def test_static_file_overlay_mounts_a_pool_file_and_needs_no_api_access():
    docs = kustomize(EPP_DIRS["static-file"])
    pod, container = _epp_container(docs)
    args, settings = epp_settings(docs)
    assert args.pool_name is None and settings.pool_file == "/etc/epp/pool.yaml"
    pool = _pool_file_of(docs, pod, container, args.pool_file, "static-file")
    assert pool.pool.name == PRIMARY and pool.pool.endpoints
    assert pod["spec"]["automountServiceAccountToken"] is False
    base_args = epp_settings(kustomize(ROOT / "epp"))[0]
    for flag in ("grpc_port", "grpc_health_port", "metrics_port", "secure_serving", "drain_timeout", "log_format"):
        assert getattr(args, flag) == getattr(base_args, flag), flag  # only the discovery differs


def test_ha_overlay_runs_two_replicas_with_leader_election():
    docs = kustomize(EPP_DIRS["ha"])
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 2
    # Recreate: a rolling update would wait for a standby (never Ready) to replace the leader.
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    _, settings = epp_settings(docs)
    assert settings.ha_enable_leader_election and settings.pool_name == PRIMARY
    assert 0 < settings.lease_retry_period < settings.lease_renew_deadline < settings.lease_duration
    assert {"get", "create", "update"} <= _role_rules(docs)[("coordination.k8s.io", "leases")]


def _pool_file_of(docs: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any], path: str,
                  where: str) -> PoolFile:
    """The pool file at ``path`` in the container: mounted from a ConfigMap built with the docs."""
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]]
    key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    assert key in cm["data"], f"{path} is not a key of ConfigMap {cm['metadata']['name']}"
    return parse_pool_file(cm["data"][key], f"{where}: {key}")


# --- the traffic-mirroring scenario (manifests/scenario) ----------------------------------
#
# The overlays are built by a small stand-in for `kustomize build` that knows exactly the
# features these manifests use (resources, components, configMapGenerator with
# create/replace/merge, JSON6902 patches inline or from a file, a strategic-merge
# `$patch: delete`, namespace). When kubectl is installed its real kustomize builds the
# same overlays (and epp's own) and the two results must agree, so the stand-in cannot drift.

SCENARIO = ROOT / "scenario"
OVERLAYS = ("v1alpha2", "v1", "load-aware-mirror")
STATIC_FILE_OVERLAYS = {"load-aware-mirror"}  # Kubernetes discovery has no mirror pool
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
        elif op["op"] == "test":
            assert parent[key] == op["value"], f"patch test failed at {op['path']}: {parent[key]!r}"
        else:
            raise AssertionError(f"unsupported patch op {op['op']}")


def _target_matches(doc: dict[str, Any], target: dict[str, str]) -> bool:
    group = doc["apiVersion"].rpartition("/")[0]
    return (
        target.get("kind", doc["kind"]) == doc["kind"]
        and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
        and target.get("group", group) == group
    )


def kustomize(directory: Path, into: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Build a Kustomization; or, with ``into``, apply a Component to the objects built so far.

    Order as kustomize's: resources, then components, then this kustomization's generators,
    then its patches, then its namespace.
    """
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kust["kind"] == ("Component" if into is not None else "Kustomization"), directory
    assert set(kust) <= {
        "apiVersion",
        "kind",
        "namespace",
        "resources",
        "components",
        "configMapGenerator",
        "generatorOptions",
        "patches",
    }, f"{directory}: feature the test does not model"
    docs: list[dict[str, Any]] = [] if into is None else into
    for entry in kust.get("resources", []):
        path = directory / entry
        assert path.exists(), f"{directory}/kustomization.yaml: resource {entry} does not exist"
        docs += kustomize(path) if path.is_dir() else _docs(path)
    for entry in kust.get("components", []):
        path = directory / entry
        assert path.is_dir(), f"{directory}/kustomization.yaml: component {entry} does not exist"
        kustomize(path, into=docs)
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
        if isinstance(ops, dict):  # a strategic-merge patch: only `$patch: delete` of one object is modelled
            assert ops.get("$patch") == "delete" and "target" not in patch, f"{directory}: unmodelled patch {ops}"
            gone = [d for d in docs if _target_matches(d, {"kind": ops["kind"], "name": ops["metadata"]["name"],
                                                             "group": ops["apiVersion"].rpartition("/")[0]})]
            assert len(gone) == 1, f"{directory}: delete of {ops['kind']} {ops['metadata']['name']} matches {len(gone)}"
            docs.remove(gone[0])
            continue
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

    @property
    def static_file(self) -> bool:
        """epp reads a pool file (the mirror overlay) instead of following the InferencePool."""
        return self.overlay in STATIC_FILE_OVERLAYS


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
    pod, _ = _epp_container(built.docs)
    return pod, epp_settings(built.docs)[0]


def _epp_pool_file(built: Built) -> PoolFile:
    assert built.static_file, f"{built.overlay}: epp follows the InferencePool, it has no pool file"
    pod, container = _epp_container(built.docs)
    return _pool_file_of(built.docs, pod, container, _epp(built)[1].pool_file, built.overlay)


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_every_yaml_file_under_manifests_parses():
    files = sorted([*ROOT.rglob("*.yaml"), *ROOT.rglob("*.yml")])
    assert len(files) >= 15
    for path in files:
        for doc in _docs(path):
            assert isinstance(doc, dict), path


def test_every_kustomization_builds_with_its_resources_present():
    found = {p.parent: yaml.safe_load(p.read_text())["kind"] for p in ROOT.rglob("kustomization.yaml")}
    assert {SCENARIO / "base", *EPP_DIRS.values(), *(SCENARIO / "overlays" / o for o in OVERLAYS)} <= set(found)
    assert [d for d, kind in found.items() if kind == "Component"] == [ROOT / "epp" / "static-file"]
    for directory, kind in sorted(found.items()):
        if kind == "Kustomization":  # a Component is built through the kustomizations using it
            assert kustomize(directory), directory


def _all_overlays() -> list[Path]:
    return [*(SCENARIO / "overlays" / o for o in OVERLAYS), *EPP_DIRS.values()]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
@pytest.mark.parametrize("directory", _all_overlays(), ids=lambda d: str(d.relative_to(ROOT)))
def test_real_kustomize_agrees_with_the_stand_in(directory):
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    assert sorted(_docs_from(out.stdout), key=key) == sorted(kustomize(directory), key=key)


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
    assert role["metadata"]["namespace"] == "default"
    assert _role_rules(built.docs) == EPP_RULES  # the same least privilege in every overlay
    assert {(g, "inferencepools") for g in POOL_GROUPS.values()} <= set(EPP_RULES)


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
    mode = ref.get("failureMode", "FailClose")
    if built.static_file:
        assert mode == _epp_pool_file(built).pool.failure_mode
    else:  # epp reads it from this very object
        assert parse_pool(pool, epp_settings(built.docs)[1].pool_group).failure_mode == mode


LLAMA2 = ModelPolicy("/model/llama2", Criticality.CRITICAL, (TargetModel("/model/llama2", 100),))


def test_inference_model_points_at_the_pool_and_matches_epps_policy(built):
    models = built.all("InferenceModel")
    if built.static_file:  # the pool file carries the policy
        assert models == []
        (policy,) = _epp_pool_file(built).models or []
        assert (policy.model_name, policy.criticality) == (LLAMA2.model_name, LLAMA2.criticality)
        assert [(t.name, t.weight) for t in policy.target_models] == [(t.name, t.weight) for t in LLAMA2.targets]
        return
    settings = epp_settings(built.docs)[1]
    seen = policies_of(models, [], pool_name=settings.pool_name, pool_group=settings.pool_group).models
    if built.pool_version() == "v1":
        assert models == [] and seen is None  # v1 has no InferenceModel: every model is routed as named
        return
    (model,) = models
    spec = model["spec"]
    assert spec["poolRef"] == {"group": POOL_GROUPS["v1alpha2"], "kind": "InferencePool", "name": PRIMARY}
    built.get("InferencePool", spec["poolRef"]["name"])
    assert model["metadata"]["namespace"] == built.get("InferencePool", PRIMARY)["metadata"]["namespace"]
    assert seen is not None and dict(seen) == {"/model/llama2": LLAMA2}  # what epp makes of it


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


def test_epp_follows_the_scenarios_pool(built):
    pod, args = _epp(built)
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "ghcr.io/epp-project/epp:0.1.0"
    assert args.command == "serve"
    ports = {p["containerPort"] for p in container["ports"]}
    assert {args.grpc_port, args.grpc_health_port, args.metrics_port} == ports
    (pool,) = built.all("InferencePool")
    vllm_port = _container_ports(_pods(built, {"app": PRIMARY})[0])["http"]
    if not built.static_file:
        # Kubernetes discovery of this very InferencePool: name, namespace (the pod's own, from
        # the downward API) and API group; what epp reads from it selects the primary pods.
        deployment = built.get("Deployment", EPP)
        settings = epp_settings(built.docs, namespace=deployment["metadata"]["namespace"])[1]
        group = pool["apiVersion"].partition("/")[0]
        assert (settings.pool_name, settings.pool_namespace, settings.pool_group) == (
            pool["metadata"]["name"], pool["metadata"]["namespace"], group)
        spec = parse_pool(pool, group)
        assert [p["metadata"]["labels"]["app"] for p in _pods(built, dict(spec.selector))] == [PRIMARY]
        assert spec.target_ports == (vllm_port,)
        return
    pool_file = _epp_pool_file(built)
    assert pool_file.pool.name == pool["metadata"]["name"]
    assert pool_file.pool.engine == "vllm"
    assert pool_file.pool.endpoints and {_port(e.address) for e in pool_file.pool.endpoint_list()} == {vllm_port}
    assert pool_file.mirror is not None and pool_file.mirror.name == SHADOW
    assert {_port(e.address) for e in pool_file.mirror.endpoint_list()} == {vllm_port}


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
