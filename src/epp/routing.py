"""Routing: an :class:`InferenceRequest` in, a :class:`Pick` out (or a ``Rejected``).

Order: model policy (unknown model → 404, weighted target split, model rewrite) →
candidates (ready endpoints, narrowed by the subset hint → 503 when none) →
admission (429 for a sheddable request when the pool is saturated) → scheduler →
primary + fallbacks (as many as the scheduler returns) → the mirror pick, made by a
second scheduler over the shadow pool.  Pure and synchronous; knows nothing of Envoy.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Protocol

from epp.domain import Criticality, Endpoint, InferenceRequest, ModelPolicies, Pick, TargetModel
from epp.errors import ModelNotFound, NoEndpoints, PathNotAllowed, clip
from epp.scheduling import Scheduler
from epp.scheduling.tokenizers import TokenizeNeed as TokenizeNeed  # noqa: PLC0414 (re-exported for extproc)
from epp.wire import ADMIN_PATHS


class Claim(Protocol):
    """One routed request's share of an endpoint's load (the datastore's ``InflightTicket``)."""

    @property
    def address(self) -> str: ...
    def move_to(self, address: str) -> None: ...
    def release(self) -> bool: ...


class Load(Protocol):
    """epp's own load ledger, as routing uses it: claims for routed requests, unseen mirror copies."""

    def acquire(self, endpoint: Endpoint, tokens: int = 0) -> Claim: ...
    def note_mirror(self, address: str) -> None: ...


class PoolView(Protocol):
    """What routing reads: the datastore satisfies it."""

    @property
    def policies(self) -> ModelPolicies: ...
    @property
    def load(self) -> Load: ...
    def endpoints(self) -> tuple[Endpoint, ...]: ...
    def get(self, address: str) -> Endpoint | None: ...
    def refresh_served_models(self, address: str) -> None: ...
    def routable(self) -> tuple[Endpoint, ...]: ...
    def mirror_endpoints(self) -> tuple[Endpoint, ...]: ...
    @property
    def serving_version(self) -> int: ...
    def servers_of(self, model: str) -> Collection[str]: ...
    def served_models(self, address: str) -> Collection[str] | None: ...


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
    """Model policy + candidates + admission + scheduler (+ the shadow pool's scheduler)."""

    def __init__(
        self,
        pool: PoolView,
        scheduler: Scheduler,
        *,
        mirror_scheduler: Scheduler | None = None,
        rng: random.Random | None = None,
        observe_schedule: Callable[[float], None] | None = None,
        blocked_paths: Sequence[str] = ADMIN_PATHS,
        trust_model_rewrite_header: bool = False,
    ) -> None:
        self._pool = pool
        self._blocked = frozenset(blocked_paths)
        self._blocked_dirs = tuple(p + "/" for p in blocked_paths)  # one startswith call per request
        self._trust_rewrite = trust_model_rewrite_header
        self._serving_cache: dict[str, tuple[Sequence[Endpoint], int, Sequence[Endpoint]]] = {}
        self._scheduler = scheduler
        self._tokenizes = scheduler.tokenizes
        self._mirror_scheduler = mirror_scheduler
        self._rng = rng or random.Random()
        self._observe = observe_schedule

    def check_path(self, path: str) -> None:
        """Raise ``PathNotAllowed`` (403) for a model server's admin path (checked on the headers, before any body)."""
        if not self._blocked:
            return
        bare = path.split("?", 1)[0]
        if bare.rstrip("/") in self._blocked or bare.startswith(self._blocked_dirs):
            raise PathNotAllowed(f"path {clip(path.split('?', 1)[0])} is a model server's admin path, not routed")

    def resolve_model(self, request: InferenceRequest) -> InferenceRequest:
        """Apply the model policy: 404 for unknown models, criticality, target model."""
        policies = self._pool.policies
        target, criticality = request.model, request.criticality
        if policies.models is not None:
            policy = policies.models.get(request.model)
            if policy is None:
                raise ModelNotFound(f"model {clip(request.model)} is not served by this pool")
            target = choose_target(policy.targets, self._rng) or request.model
            criticality = policy.criticality
        if request.objective:
            priority = policies.objectives.get(request.objective)
            if priority is not None:
                criticality = Criticality.from_priority(priority)
        if self._trust_rewrite:  # a client's own copy is ignored unless the operator trusts the header
            target = request.model_rewrite or target
        if target == request.target_model and criticality is request.criticality:
            return request
        return dataclasses.replace(request, target_model=target, criticality=criticality)

    @property
    def tokenizes(self) -> bool:
        """Whether a request may need the model server's token ids before routing (:meth:`prepare`)."""
        return self._tokenizes

    def prepare(self, request: InferenceRequest) -> tuple[InferenceRequest, list[TokenizeNeed]]:
        """The request with its model policy applied, and the ``/tokenize`` calls the transport
        makes (and delivers) before ``route(request, resolved=True)``."""
        if request.model:
            request = self.resolve_model(request)
        return request, self._scheduler.tokenize_needs(request)

    def route(self, request: InferenceRequest, *, resolved: bool = False) -> Pick:
        """Pick endpoints for a request: the model policy (for a request that names a model,
        unless ``resolved`` by :meth:`prepare`), the subset hint, admission, the scheduler and
        the mirror pick.

        The path was checked on the request headers (:meth:`check_path`), before any body;
        the transport rewrites the body when ``Pick.target_model`` differs from the model.
        """
        if request.model and not resolved:
            request = self.resolve_model(request)
        pool = self._pool.routable()
        candidates = filter_subset(pool, request.subset)
        if not candidates and request.subset is not None:  # the hint names only unreachable endpoints: obey it
            candidates = filter_subset(self._pool.endpoints(), request.subset)
        if not candidates:
            if request.subset is not None:
                raise NoEndpoints("no ready endpoint matches the destination subset hint")
            raise NoEndpoints("no ready endpoint in the pool")
        candidates = self.serving(request.target_model, candidates)
        start = time.perf_counter()
        self._scheduler.admit(request, pool)
        ranked = self._scheduler.schedule(request, candidates)
        if self._observe is not None:
            self._observe(time.perf_counter() - start)
        return Pick(endpoints=tuple(ranked), target_model=request.target_model, mirror=self.pick_mirror(request))

    # ---- the load ledger: the transport claims, moves and releases through routing ----------
    def acquire(self, pick: Pick, tokens: int) -> Claim:
        """Claim the primary's load for one routed request (released exactly once by the transport)."""
        return self._pool.load.acquire(pick.primary, tokens)

    def move(self, claim: Claim, served: str) -> bool:
        """Envoy reports it served ``served``: move the claim there if it is a pool endpoint."""
        if served == claim.address or self._pool.get(served) is None:
            return False
        claim.move_to(served)
        return True

    def not_served_by(self, address: str) -> None:
        """A pod answered 404 for a model it was picked for: have its served models read again."""
        self._pool.refresh_served_models(address)

    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._pool.endpoints()

    @property
    def mirrors(self) -> bool:
        """Whether requests get a shadow pick (and so a mirror header)."""
        return self._mirror_scheduler is not None and bool(self._pool.mirror_endpoints())

    def serving(self, model: str, candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """The candidates that can serve ``model``, when epp knows: an endpoint whose ``/v1/models``
        lists it (or that runs it as an adapter), or one that has not said what it serves.
        Unchanged when no candidate is known to serve it (it may load adapters on demand).
        """
        version = self._pool.serving_version
        cached = self._serving_cache.get(model)  # checked first: the usual request costs one dict lookup
        if cached is not None and cached[0] is candidates and cached[1] == version:
            return cached[2]
        servers = self._pool.servers_of(model)
        result: Sequence[Endpoint] = candidates
        if servers:
            served = self._pool.served_models
            narrowed = [e for e in candidates if e.address in servers or served(e.address) is None]
            if 0 < len(narrowed) < len(candidates):
                result = narrowed
        if len(self._serving_cache) > 1024:  # model names come from clients
            self._serving_cache.clear()
        self._serving_cache[model] = (candidates, version, result)
        return result

    def pick_mirror(self, request: InferenceRequest) -> Endpoint | None:
        """The shadow pool's pick (load-aware mirroring), or None without a mirror pool.

        The copy Envoy sends there is counted as unseen load until the next scrape.
        """
        shadows = self._pool.mirror_endpoints()
        if not shadows or self._mirror_scheduler is None:
            return None
        choice = self._mirror_scheduler.schedule(request, shadows)[0]
        self._pool.load.note_mirror(choice.address)
        return choice
