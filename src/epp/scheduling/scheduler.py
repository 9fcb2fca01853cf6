"""The scheduler: one decision = snapshot → admission → filters → weighted scorers → picker.

``Scheduler.schedule(request, candidates)`` returns endpoints best first (primary, then
fallbacks).  It reads one consistent snapshot (no awaits inside), so no locks.  It owns
the approximate prefix index, which learns from its own primary picks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from epp.domain import Criticality, Endpoint, EndpointMetrics, InferenceRequest
from epp.errors import NoEndpoints, Shed
from epp.scheduling.base import Candidates
from epp.scheduling.prefix import PrefixIndex, block_hashes
from epp.scheduling.profile import EndpointPickerConfig, SchedulerProfile, build_profile, builtin_config
from epp.scheduling.scorers import clamp

PluginObserver = Callable[[str, str, str, float], None]  # extension point, type, name, seconds


class SchedulingView(Protocol):
    """What the scheduler reads: the datastore satisfies it."""

    def metrics(self, address: str) -> EndpointMetrics | None: ...
    def inflight_counts(self) -> Mapping[str, int]: ...
    def inflight_token_counts(self) -> Mapping[str, int]: ...
    def unseen_counts(self) -> Mapping[str, int]: ...
    def unseen_token_counts(self) -> Mapping[str, int]: ...


class Scheduler:
    def __init__(
        self,
        profile: SchedulerProfile,
        view: SchedulingView,
        *,
        clock: Callable[[], float] = time.monotonic,
        staleness: float = 2.0,
        max_endpoints: int = 1,
        observe: PluginObserver | None = None,
    ) -> None:
        self.profile = profile
        self._view = view
        self._clock = clock
        self._staleness = staleness
        self._k = max(max_endpoints, profile.max_endpoints)
        self._observe = observe
        self.prefix_index = PrefixIndex(default_capacity=profile.prefix.capacity) if profile.prefix else None

    @property
    def name(self) -> str:
        return self.profile.name

    def snapshot(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> tuple[Candidates, list[int]]:
        """The candidates as epp sees them now, and the request's prefix hashes."""
        now, max_age = self._clock(), self._staleness
        get = self._view.metrics
        metrics: list[EndpointMetrics | None] = []
        for e in endpoints:
            m = get(e.address)
            metrics.append(m if m is not None and now - m.updated_at <= max_age else None)
        counts = self._view.inflight_counts()
        tokens = self._view.inflight_token_counts()
        addresses = [e.address for e in endpoints]
        hashes: list[int] = []
        match: Sequence[float]
        settings, index = self.profile.prefix, self.prefix_index
        if settings is not None and index is not None and request.prompt:
            block = settings.block_tokens
            if settings.auto_tune:
                block = next((m.block_size for m in metrics if m is not None and m.block_size), block)
            hashes = block_hashes(
                request.prompt, request.target_model, block_tokens=block, max_blocks=settings.max_blocks
            )
            match = index.match(hashes, addresses)
        else:
            match = [0.0] * len(endpoints)
        unseen = self._view.unseen_counts()
        unseen_tokens = self._view.unseen_token_counts()
        c = Candidates(
            endpoints=endpoints,
            metrics=metrics,
            inflight=[counts.get(a, 0) for a in addresses],
            inflight_tokens=[tokens.get(a, 0) for a in addresses],
            prefix_match=match,
            unseen=[unseen.get(a, 0) for a in addresses],
            unseen_tokens=[unseen_tokens.get(a, 0) for a in addresses],
        )
        return c, hashes

    def schedule(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        if not endpoints:
            raise NoEndpoints("no candidate endpoints")
        profile, observe = self.profile, self._observe
        c, hashes = self.snapshot(request, endpoints)
        if request.criticality is Criticality.SHEDDABLE and profile.detector.saturation(c) >= 1.0:
            raise Shed("the pool is saturated and the request is sheddable")
        for f in profile.filters:
            t0 = time.perf_counter()
            keep = f.filter(request, c)
            if observe is not None:
                observe("Filter", f.type, f.name, time.perf_counter() - t0)
            if not keep:
                raise NoEndpoints(f"filter {f.name} left no endpoint")
            if len(keep) != len(c):
                c = c.subset(keep)
        total = [0.0] * len(c)
        for scorer, weight in profile.scorers:
            t0 = time.perf_counter()
            scores = clamp(scorer.score(request, c))
            if observe is not None:
                observe("Scorer", scorer.type, scorer.name, time.perf_counter() - t0)
            if weight:
                total = [t + weight * s for t, s in zip(total, scores, strict=True)]
        t0 = time.perf_counter()
        picked = profile.picker.pick(c, total, self._k)
        if observe is not None:
            observe("Picker", profile.picker.type, profile.picker.name, time.perf_counter() - t0)
        if not picked:
            raise NoEndpoints("the picker chose no endpoint")
        primary = c.endpoints[picked[0]]
        if hashes and self.prefix_index is not None:
            m = c.metrics[picked[0]]
            auto = self.profile.prefix is not None and self.profile.prefix.auto_tune
            self.prefix_index.record(primary.address, hashes, m.num_blocks if auto and m and m.num_blocks else None)
        return [c.endpoints[i] for i in picked]


def build_scheduler(
    profile: str | EndpointPickerConfig,
    view: SchedulingView,
    *,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
    staleness: float = 2.0,
    max_endpoints: int = 1,
    observe: PluginObserver | None = None,
) -> Scheduler:
    """A scheduler for a built-in profile name or a parsed config."""
    rng = rng or random.Random()
    config = builtin_config(profile) if isinstance(profile, str) else profile
    source = f"profile {profile}" if isinstance(profile, str) else "--config-file"
    return Scheduler(
        build_profile(config, rng, source),
        view,
        clock=clock,
        staleness=staleness,
        max_endpoints=max_endpoints,
        observe=observe,
    )
