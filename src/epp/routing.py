"""Routing: an :class:`InferenceRequest` in, a :class:`Pick` out (or a ``Rejected``).

Order: model policy (unknown model → 404, weighted target split, model rewrite) →
candidates (ready endpoints, narrowed by the subset hint → 503 when none) →
scheduler → primary + fallbacks.  Pure and synchronous; knows nothing of Envoy.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from epp.domain import Criticality, Endpoint, EndpointMetrics, InferenceRequest, ModelPolicy, Pick, TargetModel
from epp.errors import ModelNotFound, NoEndpoints
from epp.openai import rewrite_model
from epp.scheduling import Scheduler

MODEL_REWRITE_HEADER = "x-gateway-model-name-rewrite"
OBJECTIVE_HEADER = "x-gateway-inference-objective"


class PoolView(Protocol):
    def endpoints(self) -> tuple[Endpoint, ...]: ...
    def policies(self) -> Mapping[str, ModelPolicy] | None: ...
    def objective_priority(self, name: str) -> int | None: ...
    def mirror_endpoints(self) -> tuple[Endpoint, ...]: ...
    def metrics(self, address: str) -> EndpointMetrics | None: ...
    def unseen_counts(self) -> Mapping[str, int]: ...
    def note_mirror(self, address: str) -> None: ...


def parse_subset(value: Any) -> tuple[str, ...] | None:
    """The subset hint as a tuple of ``ip`` / ``ip:port`` entries (list or comma string)."""
    if value is None:
        return None
    items: Iterable[Any]
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        return ()
    return tuple(s.strip() for s in items if isinstance(s, str) and s.strip())


def filter_subset(endpoints: Sequence[Endpoint], subset: tuple[str, ...] | None) -> Sequence[Endpoint]:
    """Keep endpoints named by the hint: ``ip:port`` matches exactly, a bare ``ip`` any port.

    Without a hint the pool's own (immutable) tuple is returned, so per-pool caches hold.
    """
    if subset is None:
        return endpoints
    exact = {s for s in subset if _has_port(s)}
    ips = {s.strip("[]") for s in subset if not _has_port(s)}
    return [e for e in endpoints if e.address in exact or e.ip in ips]


def _has_port(entry: str) -> bool:
    if entry.startswith("["):
        return "]:" in entry
    return entry.count(":") == 1


def choose_target(targets: Sequence[TargetModel], rng: random.Random) -> str | None:
    """Weighted draw among target models (all-zero weights → uniform)."""
    if not targets:
        return None
    total = sum(t.weight for t in targets)
    if total <= 0:
        return rng.choice(targets).name
    x = rng.random() * total
    for t in targets:
        x -= t.weight
        if x < 0:
            return t.name
    return targets[-1].name


class Router:
    """Model policy + candidates + scheduler."""

    def __init__(
        self,
        pool: PoolView,
        scheduler: Scheduler,
        *,
        max_fallbacks: int = 2,
        rng: random.Random | None = None,
        observe_schedule: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        staleness: float = 2.0,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._staleness = staleness
        self._scheduler = scheduler
        self._max_fallbacks = max_fallbacks
        self._rng = rng or random.Random()
        self._observe = observe_schedule

    def resolve_model(self, request: InferenceRequest) -> InferenceRequest:
        """Apply the model policy: 404 for unknown models, criticality, target model."""
        policies = self._pool.policies()
        target, criticality = request.model, request.criticality
        if policies is not None:
            policy = policies.get(request.model)
            if policy is None:
                raise ModelNotFound(f"model {request.model!r} is not served by this pool")
            target = choose_target(policy.targets, self._rng) or request.model
            criticality = policy.criticality
        objective = request.headers.get(OBJECTIVE_HEADER)
        if objective:
            # InferenceObjective priority: < 0 is sheddable, > 0 critical, 0 standard
            priority = self._pool.objective_priority(objective)
            if priority is not None:
                criticality = (
                    Criticality.SHEDDABLE
                    if priority < 0
                    else Criticality.CRITICAL
                    if priority > 0
                    else Criticality.STANDARD
                )
        target = request.headers.get(MODEL_REWRITE_HEADER) or target
        if target == request.target_model and criticality is request.criticality:
            return request
        return dataclasses.replace(request, target_model=target, criticality=criticality)

    def route(self, request: InferenceRequest, doc: dict[str, Any] | None = None) -> Pick:
        """Pick endpoints for a parsed request; rewrite the body if the target model differs."""
        if doc is not None:
            request = self.resolve_model(request)
        candidates = filter_subset(self._pool.endpoints(), request.subset)
        if not candidates:
            if request.subset is not None:
                raise NoEndpoints("no ready endpoint matches the destination subset hint")
            raise NoEndpoints("no ready endpoint in the pool")
        start = time.perf_counter()
        ranked = self._scheduler.schedule(request, candidates)
        if self._observe is not None:
            self._observe(time.perf_counter() - start)
        if not ranked:
            raise NoEndpoints("the scheduler found no endpoint")
        body = None
        if doc is not None and request.target_model != request.model:
            body = rewrite_model(doc, request.target_model)
        return Pick(
            endpoints=tuple(ranked[: 1 + self._max_fallbacks]),
            target_model=request.target_model,
            body=body,
            mirror=self.pick_mirror(),
        )

    def pick_mirror(self) -> Endpoint | None:
        """The least-loaded shadow endpoint (load-aware mirroring), or None without a mirror pool.

        Load, compared in order: requests waiting (scraped, plus copies sent since that
        scrape), then requests running; an endpoint without fresh metrics only wins if
        no other has any.  Ties break at random.
        """
        shadows = self._pool.mirror_endpoints()
        if not shadows:
            return None
        now, max_age = self._clock(), self._staleness
        unseen = self._pool.unseen_counts()
        best: list[Endpoint] = []
        best_load: tuple[float, float] = (math.inf, math.inf)
        for e in shadows:
            m = self._pool.metrics(e.address)
            sent = unseen.get(e.address, 0)
            if m is not None and now - m.updated_at <= max_age:
                load: tuple[float, float] = (m.waiting + sent, m.running)
            else:
                load = (1e9 + sent, 0.0)
            if load < best_load:
                best, best_load = [e], load
            elif load == best_load:
                best.append(e)
        choice = best[0] if len(best) == 1 else self._rng.choice(best)
        self._pool.note_mirror(choice.address)
        return choice
