"""Parse every manifest and check the cross-references a typo would break."""

from __future__ import annotations

from pathlib import Path

import yaml

from epp.cli import build_parser
from epp.config import parse_pool_file

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
