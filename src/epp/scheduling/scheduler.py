"""The scheduler: one decision = snapshot → (sample) → filters → weighted scorers → picker.

``Scheduler.schedule(request, candidates)`` returns endpoints best first (primary, then
fallbacks): at most ``max_endpoints``, decided here and nowhere else.
``Scheduler.admit(request, pool)`` is the admission check (a sheddable request is shed
when the whole pool is saturated).  Both read one consistent snapshot (no awaits
inside), so no locks.  The scheduler owns the approximate prefix index, which learns
from its own primary picks.  Its random generator is the one it was built with, so a
seeded scheduler decides reproducibly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol, runtime_checkable

from epp.domain import Criticality, Endpoint, EndpointMetrics, InferenceRequest
from epp.errors import NoEndpoints, Shed
from epp.scheduling.base import Candidates
from epp.scheduling.blockkeys import BlockLookup
from epp.scheduling.prefix import PrefixIndex, block_hashes
from epp.scheduling.profile import EndpointPickerConfig, SchedulerProfile, build_profile, builtin_config
from epp.scheduling.scorers import PrecisePrefixCacheScorer, bind_block_lookup, clamp
from epp.scheduling.tokenizers import ServerTokenizer, TokenizeNeed

# extension point, plugin type, plugin name -> that plugin's duration observer (seconds); asked once per
# plugin when the scheduler is built, so a decision pays one call per plugin, not a label lookup
PluginObserver = Callable[[str, str, str], Callable[[float], None]]


def _unobserved(seconds: float) -> None:
    return None


class LoadView(Protocol):
    """epp's own load per address (absent = 0): the datastore's ledger satisfies it."""

    @property
    def requests(self) -> Mapping[str, int]: ...
    @property
    def tokens(self) -> Mapping[str, int]: ...
    @property
    def unseen(self) -> Mapping[str, int]: ...
    @property
    def unseen_tokens(self) -> Mapping[str, int]: ...


class SchedulingView(Protocol):
    """What the scheduler reads: the datastore satisfies it."""

    @property
    def load(self) -> LoadView: ...
    def metrics(self, address: str) -> EndpointMetrics | None: ...
    def fresh_metrics_of(self, addresses: Sequence[str]) -> list[EndpointMetrics | None]: ...
    def endpoints_with_adapter(self, adapter: str) -> Collection[str]: ...


@runtime_checkable
class PreRequest(Protocol):
    """A plugin told of every decision's primary pick, before the request is sent."""

    def pre_request(self, request: InferenceRequest, c: Candidates, picked: int) -> None: ...


class Scheduler:
    def __init__(
        self,
        profile: SchedulerProfile,
        view: SchedulingView,
        *,
        max_endpoints: int = 1,
        observe: PluginObserver | None = None,
        rng: random.Random | None = None,
        peers: LoadView | None = None,
    ) -> None:
        self.profile = profile
        self._peers = peers  # active-active: the other replicas' load (epp.datalayer.peers.PeerLoad)
        self._max_candidates = profile.max_candidates
        self._positions_of: Sequence[Endpoint] | None = None
        self._positions_map: dict[str, int] = {}
        self._rng = rng or random.Random()
        self._view = view
        # the picker's maxNumOfEndpoints, when the profile sets it, wins over the flag
        self.max_endpoints = profile.max_endpoints or max_endpoints
        timer = observe or (lambda point, type_, name: _unobserved)
        self._filters = [(f, timer("Filter", f.type, f.name)) for f in profile.filters]
        self._scorers = [(s, w, timer("Scorer", s.type, s.name)) for s, w in profile.scorers]
        self._picker_timer = timer("Picker", profile.picker.type, profile.picker.name)
        self.prefix_index = PrefixIndex(default_capacity=profile.prefix.capacity) if profile.prefix else None
        # PreRequest: plugins told of each primary pick (the precise prefix scorer's speculative entries)
        self._pre_request: list[PreRequest] = [
            inner for s, _ in profile.scorers if isinstance(inner := getattr(s, "inner", s), PreRequest)
        ]
        # precise scorers on KV events that read the model server's own token ids (tokenizer:
        # vllm-tokenize); without the KV-event index (bound before this) they score on the approximate one
        self._server_tokens = [
            inner
            for s, _ in profile.scorers
            if isinstance(inner := getattr(s, "inner", s), PrecisePrefixCacheScorer)
            and isinstance(inner.keys.tokenizer, ServerTokenizer)
            and inner.index is not None
        ]

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def tokenizes(self) -> bool:
        """Whether decisions may need the model server's token ids first (``tokenize_needs``)."""
        return bool(self._server_tokens)

    def tokenize_needs(self, request: InferenceRequest) -> list[TokenizeNeed]:
        """The ``/tokenize`` calls to make (and deliver) before :meth:`schedule`, usually none:
        a precise scorer on ``vllm-tokenize`` whose cache lacks this prompt.  Without them the
        decision still comes, on the approximate index."""
        if not self._server_tokens:
            return []
        return [n for s in self._server_tokens if (n := s.tokenize_need(request)) is not None]

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
        """At most ``max_candidates`` endpoints (the profile's ``candidate-sampler``): up to
        a quarter of them holders of the prompt's longest cached prefix, up to a quarter
        with the requested adapter loaded (a random few when more hold it), the rest a
        uniform random sample.

        Power-of-d choices: picking the best of a random few balances nearly as well as
        scanning all, and keeps a decision's cost flat as pools grow to hundreds.
        """
        budget = self._max_candidates or len(endpoints)
        keep: dict[str, Endpoint] = {}
        # a quarter of the budget each for adapter and prefix holders; at least half stays random,
        # so a less loaded endpoint is always in the running even when the holders are hot
        quarter = max(1, budget // 4)
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
        room = budget - len(keep)
        if room > 0:  # random draws may repeat an affinity endpoint: draw a few extra
            for i in self._rng.sample(range(len(endpoints)), min(len(endpoints), room + len(keep))):
                keep.setdefault(endpoints[i].address, endpoints[i])
                if len(keep) >= budget:
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
        addresses = [e.address for e in endpoints]
        index = self.prefix_index
        match: Sequence[float] = (
            index.match(hashes, addresses) if hashes and index is not None else [0.0] * len(endpoints)
        )
        own, peers = self._view.load, self._peers
        fields = [own.requests, own.tokens, own.unseen, own.unseen_tokens]
        if peers is not None and (peers.requests or peers.unseen):  # active-active: every replica's sends
            theirs = (peers.requests, peers.tokens, peers.unseen, peers.unseen_tokens)
            counts, tokens, unseen, unseen_tokens = (
                [m.get(a, 0) + p.get(a, 0) for a in addresses] for m, p in zip(fields, theirs, strict=True)
            )
        else:
            counts, tokens, unseen, unseen_tokens = ([m.get(a, 0) for a in addresses] for m in fields)
        return Candidates(
            endpoints=endpoints,
            metrics=self._view.fresh_metrics_of(addresses),
            inflight=counts,
            inflight_tokens=tokens,
            prefix_match=match,
            unseen=unseen,
            unseen_tokens=unseen_tokens,
        )

    def admit(self, request: InferenceRequest, pool: Sequence[Endpoint]) -> None:
        """Raise ``Shed`` for a sheddable request when the whole pool is saturated."""
        if request.criticality is Criticality.SHEDDABLE:
            metrics = self._view.fresh_metrics_of([e.address for e in pool])
            if self.profile.detector.saturation(metrics) >= 1.0:
                raise Shed("the pool is saturated and the request is sheddable")

    def schedule(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        if not endpoints:
            raise NoEndpoints("no candidate endpoints")
        hashes = self.prefix_hashes(request, endpoints)
        if self._max_candidates is not None and len(endpoints) > self._max_candidates:
            endpoints = self.sample(request, endpoints, hashes)
        c = self.snapshot(request, endpoints, hashes)
        clock = time.perf_counter
        for f, timer in self._filters:
            t0 = clock()
            keep = f.filter(request, c)
            timer(clock() - t0)
            if not keep:
                raise NoEndpoints(f"filter {f.name} left no endpoint")
            if len(keep) != len(c):
                c = c.subset(keep)
        total: list[float] | None = None
        for scorer, weight, timer in self._scorers:
            t0 = clock()
            scores = scorer.score(request, c)
            timer(clock() - t0)
            if not weight:
                continue
            if len(scores) != len(c):
                raise ValueError(f"scorer {scorer.name} gave {len(scores)} scores for {len(c)} candidates")
            if not (min(scores) >= 0.0 and max(scores) <= 1.0):  # so that a NaN in first place clamps too
                scores = clamp(scores)
            if total is None:
                total = list(scores) if weight == 1 else [weight * s for s in scores]
            else:
                total = [t + weight * s for t, s in zip(total, scores, strict=False)]  # lengths checked above
        t0 = clock()
        picked = self.profile.picker.pick(c, total or [0.0] * len(c), self.max_endpoints)
        self._picker_timer(clock() - t0)
        if not picked:
            raise NoEndpoints("the picker chose no endpoint")
        primary = c.endpoints[picked[0]]
        if hashes and self.prefix_index is not None:
            m = c.metrics[picked[0]]
            auto = self.profile.prefix is not None and self.profile.prefix.auto_tune
            self.prefix_index.record(primary.address, hashes, m.num_blocks if auto and m and m.num_blocks else None)
        for plugin in self._pre_request:
            plugin.pre_request(request, c, picked[0])
        return [c.endpoints[i] for i in picked]


def build_scheduler(
    profile: str | EndpointPickerConfig,
    view: SchedulingView,
    *,
    rng: random.Random | None = None,
    max_endpoints: int = 1,
    observe: PluginObserver | None = None,
    kv_index: BlockLookup | None = None,
    peers: LoadView | None = None,
) -> Scheduler:
    """A scheduler for a built-in profile name or a parsed config; ``rng`` drives every random choice.

    ``kv_index`` (the KV-event index, ``epp.datalayer.kvevents.KVEventIndex``) feeds the
    profile's ``precise-prefix-cache-scorer``s; without it they use the approximate index only.
    ``peers`` (``epp.datalayer.peers.PeerLoad``) adds the other replicas' load to this one's.
    """
    rng = rng or random.Random()
    config = builtin_config(profile) if isinstance(profile, str) else profile
    source = f"profile {profile}" if isinstance(profile, str) else "--config-file"
    built = build_profile(config, rng, source)
    bind_block_lookup((s for s, _ in built.scorers), kv_index)
    return Scheduler(built, view, max_endpoints=max_endpoints, observe=observe, rng=rng, peers=peers)
