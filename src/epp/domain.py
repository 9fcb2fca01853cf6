"""Frozen value types used on every request.

Invariants: these objects are never mutated.  The scraper swaps in a new
``EndpointMetrics``; discovery swaps in new ``Pool`` and ``ModelPolicies`` values;
routing returns a new ``Pick``.  They carry no transport (gRPC/Envoy) types.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# epp has no tokenizer: a prompt's token count is estimated as characters / 4 (the usual
# rule of thumb for English text with BPE tokenizers).  The one place this is decided.
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """Estimated tokens in ``text`` (rounded up)."""
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


_NO_LABELS: Mapping[str, str] = MappingProxyType({})


class Criticality(enum.StrEnum):
    CRITICAL = "Critical"
    STANDARD = "Standard"
    SHEDDABLE = "Sheddable"

    @classmethod
    def from_priority(cls, priority: int) -> Criticality:
        """InferenceObjective priority: below 0 is sheddable, above 0 critical, 0 standard."""
        return cls.SHEDDABLE if priority < 0 else cls.CRITICAL if priority > 0 else cls.STANDARD


class FailureMode(enum.StrEnum):
    """What the gateway does when epp cannot answer (``InferencePool`` failureMode)."""

    FAIL_OPEN = "FailOpen"
    FAIL_CLOSE = "FailClose"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address serving models: ``ip:port`` plus a display name."""

    address: str
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _NO_LABELS, compare=False, hash=False)

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
class ModelPolicies:
    """The model side of a pool: which client-facing models it serves, and the objectives.

    ``models`` None means no allowlist: every model is accepted and sent as named.
    ``objectives`` maps an InferenceObjective name to its priority.
    """

    models: Mapping[str, ModelPolicy] | None = None
    objectives: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(
        cls, models: Mapping[str, ModelPolicy] | None = None, objectives: Mapping[str, int] | None = None
    ) -> ModelPolicies:
        """Read-only copies of the given mappings."""
        return cls(
            models=MappingProxyType(dict(models)) if models is not None else None,
            objectives=MappingProxyType(dict(objectives or {})),
        )


@dataclass(frozen=True, slots=True)
class Pool:
    """One pool of model-server endpoints, as discovery last saw it.

    A mirror (shadow) pool is just another ``Pool``.  ``engine`` is the pool's default
    metric dialect; a pod's ``inference.networking.k8s.io/engine-type`` label overrides
    it.  ``target_ports`` are the ports every selected pod serves on (one endpoint per pod
    and port); the static pool file lists endpoints directly and leaves them empty.
    """

    name: str
    namespace: str = "default"
    engine: str = "vllm"
    failure_mode: FailureMode = FailureMode.FAIL_CLOSE
    target_ports: tuple[int, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    selector: Mapping[str, str] = field(default_factory=lambda: _NO_LABELS, compare=False, hash=False)


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """A parsed request, free of transport details."""

    request_id: str
    model: str
    target_model: str
    prompt: str = ""
    prompt_tokens: int = 0
    stream: bool = False
    subset: tuple[str, ...] | None = None
    criticality: Criticality = Criticality.STANDARD
    objective: str = ""  # the InferenceObjective named by the request (transport-extracted)
    model_rewrite: str = ""  # the gateway's model-rewrite header, if any (routing decides whether to trust it)
    headers: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    # chat requests: (role, text) per message, for a tokenizer that renders the server's chat template
    messages: tuple[tuple[str, str], ...] = field(default=(), compare=False, hash=False)
    # what a model server needs to tokenize the prompt as it will (``tokenizer: vllm-tokenize``), as the
    # client sent it: a chat's rendering fields (messages, tools, template settings), ``{"prompt": text}``,
    # or ``{"token_ids": [...]}`` for a prompt given as ids; None for a batch of prompts
    prompt_source: Mapping[str, object] | None = field(default=None, compare=False, hash=False)


@dataclass(frozen=True, slots=True)
class Pick:
    """Routing decision: endpoints (primary first, then fallbacks), the model to send, the shadow pick."""

    endpoints: tuple[Endpoint, ...]
    target_model: str = ""
    mirror: Endpoint | None = None

    @property
    def primary(self) -> Endpoint:
        return self.endpoints[0]
