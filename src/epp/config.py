"""Everything read from flags and files, validated once at start.

* ``PoolFile``: the static pool YAML (pydantic, ``extra="forbid"``).  A bad file raises
  :class:`~epp.errors.ConfigError` with one line naming the field.
* ``Settings``: the immutable result of argument parsing, passed down by constructors.
* ``parse_duration``: Go-style durations (``50ms``, ``2s``, ``1m30s``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from epp.domain import Criticality, Endpoint, FailureMode, ModelPolicies, ModelPolicy, Pool, TargetModel
from epp.errors import ConfigError
from epp.wire import MAX_REQUEST_HEADERS

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Parse a Go duration string into seconds (``"50ms"`` → 0.05, ``"1m30s"`` → 90)."""
    s = text.strip()
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ConfigError(f"invalid duration {text!r}: expected e.g. 50ms, 2s, 1m")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ConfigError(f"invalid duration {text!r}: expected e.g. 50ms, 2s, 1m")
    return total


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise ConfigError(f"invalid boolean {text!r}: expected true or false")


_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


def check_address(address: str) -> str:
    m = _ADDRESS.match(address)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return address


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class EndpointSpec(_Strict):
    address: str
    name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return check_address(v)


class PoolSpec(_Strict):
    name: str
    namespace: str = "default"
    engine: Literal["vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm"] = "vllm"
    failure_mode: FailureMode = Field(FailureMode.FAIL_CLOSE, alias="failureMode")
    endpoints: list[Annotated[str, Field()] | EndpointSpec] = Field(default_factory=list)

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: list[str | EndpointSpec]) -> list[str | EndpointSpec]:
        seen: set[str] = set()
        for item in v:
            address = check_address(item) if isinstance(item, str) else item.address
            if address in seen:
                raise ValueError(f"duplicate endpoint {address}")
            seen.add(address)
        return v

    def endpoint_list(self) -> tuple[Endpoint, ...]:
        out = []
        for i, item in enumerate(self.endpoints):
            if isinstance(item, str):
                out.append(Endpoint(address=item, name=f"{self.name}-{i}"))
            else:
                out.append(
                    Endpoint(
                        address=item.address,
                        name=item.name or f"{self.name}-{i}",
                        labels=MappingProxyType(dict(item.labels)),
                    )
                )
        return tuple(out)

    def to_pool(self) -> Pool:
        return Pool(
            name=self.name,
            namespace=self.namespace,
            engine=self.engine,
            failure_mode=self.failure_mode,
            endpoints=self.endpoint_list(),
        )


class TargetModelSpec(_Strict):
    name: str = Field(min_length=1, max_length=253)
    weight: int = Field(100, ge=0, le=1_000_000)


class ModelSpec(_Strict):
    model_name: str = Field(alias="modelName", min_length=1, max_length=256)
    criticality: Criticality = Criticality.STANDARD
    target_models: list[TargetModelSpec] = Field(default_factory=list, alias="targetModels", max_length=10)

    def policy(self) -> ModelPolicy:
        return ModelPolicy(
            model_name=self.model_name,
            criticality=self.criticality,
            targets=tuple(TargetModel(t.name, t.weight) for t in self.target_models),
        )


class ObjectiveSpec(_Strict):
    """InferenceObjective: selected per request by name in ``x-gateway-inference-objective``."""

    name: str = Field(min_length=1)
    priority: int = 0


class PoolFile(_Strict):
    """The static pool file: one pool, optional models, objectives and mirror (shadow) pool."""

    pool: PoolSpec
    models: list[ModelSpec] | None = None
    objectives: list[ObjectiveSpec] = Field(default_factory=list)
    mirror: PoolSpec | None = None

    @field_validator("models")
    @classmethod
    def _unique_models(cls, v: list[ModelSpec] | None) -> list[ModelSpec] | None:
        if v is not None:
            names = [m.model_name for m in v]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"duplicate modelName {sorted(dup)[0]}")
        return v

    def policies(self) -> ModelPolicies:
        models = None if self.models is None else {m.model_name: m.policy() for m in self.models}
        return ModelPolicies.of(models, {o.name: o.priority for o in self.objectives})


def _location(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "EndpointSpec"):  # union branch names pydantic adds
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_pool_file(text: str, source: str = "pool file") -> PoolFile:
    """Validate pool-file YAML text; raise ConfigError with one line naming the field."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'pool' key")
    try:
        return PoolFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{source}: {_location(err['loc'])}: {msg}") from None


def load_pool_file(path: str | Path) -> PoolFile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read pool file {p}: {exc.strerror}") from None
    return parse_pool_file(text, str(p))


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole configuration of ``epp serve``; built once in ``cli.py``.

    Discovery is the pool file when ``pool_file`` is set, else Kubernetes (``pool_name``).
    """

    pool_file: str | None = None
    pool_name: str = ""
    pool_namespace: str = "default"
    pool_group: str = "inference.networking.k8s.io"
    kubeconfig: str | None = None  # None: in-cluster config
    ha_enable_leader_election: bool = False
    lease_duration: float = 15.0
    lease_renew_deadline: float = 10.0
    lease_retry_period: float = 2.0
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    grpc_address: str | None = None  # also serve ext_proc + health on this unix:///path socket (plaintext)
    bind_address: str = "0.0.0.0"
    secure_serving: bool = True
    cert_path: str | None = None
    config_file: str | None = None
    scheduling_profile: str = "epp-default"
    refresh_metrics_interval: float = 0.05
    metrics_staleness_threshold: float = 2.0
    pool_file_poll_interval: float = 1.0
    max_body_bytes: int = 16 * 1024 * 1024
    max_request_headers: int = MAX_REQUEST_HEADERS
    max_fallback_endpoints: int = 2
    drain_timeout: float = 30.0
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"
    # GIE conformance test hooks: honour test-epp-endpoint-selection, echo the served endpoint
    conformance_test_hooks: bool = False
    trust_model_rewrite_header: bool = False
    kv_events_port: int = 0  # 0: no KV-event subscription
    kv_events_topic_template: str = "kv@{address}@"
    kv_events_bind: str = ""  # bind mode: one SUB socket pods connect to (llm-d-inference-sim, vLLM with a host)
    peer_bind: str = ""  # active-active: publish this replica's load and speculative picks here (ZMQ PUB)
    peers: tuple[str, ...] = ()  # host:port of the other replicas (a headless Service name finds them all)
    route_admin_paths: bool = False
    # --workers N: N processes serve the same ports (SO_REUSEPORT) and share load as peers (epp.workers)
    workers: int = 1
    reuse_port: bool = False  # set for each worker process, so its siblings can bind the same ports
    worker_peer_bind: str = ""  # a worker's own peer endpoint (ipc:// in the parent's private directory)
    worker_peers: tuple[str, ...] = ()  # its siblings' peer endpoints (full ZMQ endpoints, connected as given)
