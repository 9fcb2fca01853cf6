"""Frozen value types used on every request.

Invariants: these objects are never mutated.  The scraper swaps in a new
``EndpointMetrics``; discovery swaps in new ``Endpoint`` sets; routing returns a new
``Pick``.  They carry no transport (gRPC/Envoy) types.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Criticality(enum.StrEnum):
    CRITICAL = "Critical"
    STANDARD = "Standard"
    SHEDDABLE = "Sheddable"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address serving models: ``ip:port`` plus a display name."""

    address: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def ip(self) -> str:
        host, _, _ = self.address.rpartition(":")
        return host.strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """One scrape of a model server's /metrics (filled in by the scraper)."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    active_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_lora: int = 0
    block_size: int = 0
    num_blocks: int = 0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class TargetModel:
    name: str
    weight: int


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """Client-facing model name → criticality and weighted target models."""

    model_name: str
    criticality: Criticality = Criticality.STANDARD
    targets: tuple[TargetModel, ...] = ()


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """A parsed request, free of transport details."""

    request_id: str
    model: str
    target_model: str
    prompt: str = ""
    prompt_tokens: int = 0
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    path: str = ""
    subset: tuple[str, ...] | None = None
    criticality: Criticality = Criticality.STANDARD
    headers: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, slots=True)
class Pick:
    """Routing decision: endpoints (primary first, then fallbacks) and an optional new body."""

    endpoints: tuple[Endpoint, ...]
    target_model: str = ""
    body: bytes | None = None
    mirror: Endpoint | None = None

    @property
    def primary(self) -> Endpoint:
        return self.endpoints[0]
