"""The scheduler: one decision = snapshot → admission → filters → weighted scorers → picker.

``Scheduler.schedule(request, candidates)`` returns endpoints best first (primary, then
fallbacks).  It reads one consistent snapshot (no awaits inside), so no locks.  It owns
the approximate prefix index, which learns from its own primary picks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
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
    def endpoints_with_adapter(self, adapter: str) -> Collection[str]: ...


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
        max_candidates: int = 16,
        rng: random.Random | None = None,
    ) -> None:
        self.profile = profile
        self._max_candidates = max_candidates
        self._positions_of: Sequence[Endpoint] | None = None
        self._positions_map: dict[str, int] = {}
        self._rng = rng or random.Random()
        self._view = view
        self._clock = clock
        self._staleness = staleness
        self._k = max(max_endpoints, profile.max_endpoints)
        self._observe = observe
        self.prefix_index = PrefixIndex(default_capacity=profile.prefix.capacity) if profile.prefix else None

    @property
    def name(self) -> str:
        return self.profile.name

    def prefix_hashes(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[int]:
        settings = self.profile.prefix
        if settings is None or self.prefix_index is None or not request.prompt:
            return []
        block = settings.block_tokens
        if settings.auto_tune:  # the servers' own block size, from cache_config_info
            for e in endpoints[:8]:
                m = self._view.metrics(e.address)
                if m is not None and m.block_size:
                    block = m.block_size
                    break
        return block_hashes(request.prompt, request.target_model, block_tokens=block, max_blocks=settings.max_blocks)

    def sample(self, request: InferenceRequest, endpoints: Sequence[Endpoint], hashes: Sequence[int]) -> list[Endpoint]:
        """At most ``max_candidates`` (16) endpoints: up to a quarter of them holders of the
        prompt's longest cached prefix, up to a quarter with the requested adapter loaded,
        the rest a uniform random sample.

        Power-of-d choices: picking the best of a random few balances nearly as well as
        scanning all, and keeps a decision's cost flat as pools grow to hundreds.
        """
        keep: dict[str, Endpoint] = {}
        # a quarter of the budget each for adapter and prefix holders; at least half stays random,
        # so a less loaded endpoint is always in the running even when the holders are hot
        quarter = max(1, self._max_candidates // 4)
        with_adapter = self._view.endpoints_with_adapter(request.target_model)
        wanted: set[str] = (
            set(with_adapter) if len(with_adapter) <= quarter else set(self._rng.sample(list(with_adapter), quarter))
        )
        if hashes and self.prefix_index is not None:
            deepest: set[str] = set()
            for h in hashes:  # the holders of the longest prefix anyone holds
                found = self.prefix_index.holders(h)
                if not found:
                    break
                deepest = found
            wanted |= deepest if len(deepest) <= quarter else set(self._rng.sample(list(deepest), quarter))
        if wanted:
            for e in endpoints if len(wanted) * 8 > len(endpoints) else ():
                if e.address in wanted:
                    keep[e.address] = e
            if not keep:  # few affinity endpoints: find them without scanning the whole list
                position = self._positions(endpoints)
                for a in wanted:
                    i = position.get(a)
                    if i is not None:
                        keep[a] = endpoints[i]
        room = self._max_candidates - len(keep)
        if room > 0:  # random draws may repeat an affinity endpoint: draw a few extra
            for i in self._rng.sample(range(len(endpoints)), min(len(endpoints), room + len(keep))):
                keep.setdefault(endpoints[i].address, endpoints[i])
                if len(keep) >= self._max_candidates:
                    break
        return list(keep.values())

    def _positions(self, endpoints: Sequence[Endpoint]) -> dict[str, int]:
        """address → index for this candidate list, cached while the list object is unchanged."""
        if self._positions_of is not endpoints:
            self._positions_of = endpoints
            self._positions_map = {e.address: i for i, e in enumerate(endpoints)}
        return self._positions_map

    def snapshot(
        self, request: InferenceRequest, endpoints: Sequence[Endpoint], hashes: Sequence[int] = ()
    ) -> Candidates:
        """The candidates as epp sees them now."""
        now, max_age = self._clock(), self._staleness
        get = self._view.metrics
        metrics: list[EndpointMetrics | None] = []
        for e in endpoints:
            m = get(e.address)
            metrics.append(m if m is not None and now - m.updated_at <= max_age else None)
        counts = self._view.inflight_counts()
        tokens = self._view.inflight_token_counts()
        addresses = [e.address for e in endpoints]
        index = self.prefix_index
        match: Sequence[float] = (
            index.match(hashes, addresses) if hashes and index is not None else [0.0] * len(endpoints)
        )
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
        return c

    def schedule(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        if not endpoints:
            raise NoEndpoints("no candidate endpoints")
        profile, observe = self.profile, self._observe
        hashes = self.prefix_hashes(request, endpoints)
        if len(endpoints) > self._max_candidates > 0:
            endpoints = self.sample(request, endpoints, hashes)
        c = self.snapshot(request, endpoints, hashes)
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
