"""Small helpers shared by the tests (see tests/README.md for what lives where).

Here: pool and datastore builders, pool-file documents, ``Settings`` for an in-process
App on free ports, reading a metric.  Beside it: ``support.messages`` (ext_proc messages
and a client), ``support.upstreams`` (HTTP stand-ins and waiting for arrivals),
``support.serve`` (``epp serve`` as a process, up to its ready line),
``support.scheduling`` (metrics, requests and candidates for scheduler tests),
``support.vllm_page`` and ``support.llmd_sim``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from epp.config import Settings
from epp.datalayer import Datastore
from epp.domain import Endpoint, ModelPolicies, ModelPolicy, Pool

DATA = Path(__file__).resolve().parent.parent / "data"  # recorded /metrics pages

# the model policy most tests use: clients say "m", the pods are asked for "m-target"
MODELS: list[dict[str, Any]] = [
    {"modelName": "m", "criticality": "Critical", "targetModels": [{"name": "m-target", "weight": 100}]}
]
MODEL_LABELS = {"model_name": "m", "target_model_name": "m-target"}


def pool(endpoints: Iterable[Endpoint], name: str = "p", **kw: object) -> Pool:
    return Pool(name=name, endpoints=tuple(endpoints), **kw)  # type: ignore[arg-type]


def datastore(
    endpoints: Iterable[Endpoint] = (),
    *,
    models: Mapping[str, ModelPolicy] | None = None,
    objectives: Mapping[str, int] | None = None,
    mirror: Iterable[Endpoint] | None = None,
    clock: Callable[[], float] | None = None,
    staleness: float = 2.0,
) -> Datastore:
    """A datastore holding pool ``p`` (and mirror pool ``p-shadow`` when given)."""
    store = Datastore(staleness=staleness, clock=clock) if clock else Datastore(staleness=staleness)
    store.apply(
        pool(endpoints),
        pool(mirror, name="p-shadow") if mirror is not None else None,
        ModelPolicies.of(models, objectives),
    )
    return store


def pool_doc(
    endpoints: Iterable[Any],
    *,
    models: list[dict[str, Any]] | None = None,
    mirror: Iterable[str] | None = None,
    failure_mode: str = "FailClose",
    name: str = "test-pool",
) -> dict[str, Any]:
    """A pool file's document: pool ``test-pool``, optional ``models`` and mirror ``test-shadow``."""
    doc: dict[str, Any] = {"pool": {"name": name, "failureMode": failure_mode, "endpoints": list(endpoints)}}
    if models is not None:
        doc["models"] = models
    if mirror is not None:
        doc["mirror"] = {"name": "test-shadow", "endpoints": list(mirror)}
    return doc


def write_yaml(path: Path, doc: Any) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def settings(pool_path: Path, **overrides: Any) -> Settings:
    """Settings for an in-process App: every port 0 on 127.0.0.1, plaintext, fast pool-file polling."""
    values: dict[str, Any] = dict(
        pool_file=str(pool_path), grpc_port=0, grpc_health_port=0, metrics_port=0, bind_address="127.0.0.1",
        secure_serving=False, drain_timeout=2.0, pool_file_poll_interval=0.05,
    )
    values.update(overrides)
    return Settings(**values)


def value(app: Any, name: str, labels: Mapping[str, str] | None = None) -> float:
    """One sample of an App's metrics registry; 0.0 when the series does not exist (yet)."""
    v = app.metrics.registry.get_sample_value(name, dict(labels or {}))
    return 0.0 if v is None else v


# epp's least privilege (manifests/epp/rbac.yaml): read its pool, the pods, the model objects;
# the Lease for HA.  The manifest tests check the file says this; the Kubernetes tests check
# the API server grants exactly this.
EPP_RBAC_RULES: dict[tuple[str, str], set[str]] = {
    ("", "pods"): {"get", "list", "watch"},
    ("inference.networking.k8s.io", "inferencepools"): {"get", "list", "watch"},
    ("inference.networking.x-k8s.io", "inferencepools"): {"get", "list", "watch"},
    ("inference.networking.x-k8s.io", "inferencemodels"): {"get", "list", "watch"},
    ("inference.networking.x-k8s.io", "inferenceobjectives"): {"get", "list", "watch"},
    ("llm-d.ai", "inferenceobjectives"): {"get", "list", "watch"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
}
