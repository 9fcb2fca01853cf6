"""Scorers: one score in 0..1 per candidate, higher is better.

Reference formulas (Go EPP) where the type name is shared; ``inflight-load-scorer``
and the affinity guard are epp's own.  Missing or stale metrics score as worst.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from epp.domain import InferenceRequest
from epp.scheduling.base import Candidates, min_max_low_is_best
from epp.scheduling.blockkeys import BlockKeys, BlockLookup
from epp.scheduling.tokenizers import ServerTokenizer, TokenizeNeed, TokensPending

_UNKNOWN_QUEUE = 1 << 20  # a stale endpoint's queue: worse than any real one
_MISSING = object()


@dataclass
class QueueScorer:
    """``(maxQ - q) / (maxQ - minQ)`` over the candidates' waiting queues."""

    name: str = "queue-scorer"
    type: str = "queue-scorer"

    def score(self, request: InferenceRequest, c: Candidates) -> list[float]:
        return min_max_low_is_best([m.waiting if m else _UNKNOWN_QUEUE for m in c.metrics])


@dataclass
class RunningRequestsScorer:
    """The same min-max formula on running requests."""

    name: str = "running-requests-size-scorer"
    type: str = "running-requests-size-scorer"

    def score(self, request: InferenceRequest, c: Candidates) -> list[float]:
        return min_max_low_is_best([m.running if m else _UNKNOWN_QUEUE for m in c.metrics])


@dataclass
class KvCacheScorer:
    """``1 - kv_cache_usage``."""

    name: str = "kv-cache-utilization-scorer"
    type: str = "kv-cache-utilization-scorer"

    def score(self, request: InferenceRequest, c: Candidates) -> list[float]:
        return [1.0 - m.kv_usage if m else 0.0 for m in c.metrics]


@dataclass
class LoraAffinityScorer:
    """Adapter active 1.0 > free adapter slot 0.8 > adapter waiting 0.6 > none 0.

    A request for the base model (the target is no adapter any candidate reports and
    the endpoint has no LoRA slots in use) scores 1.0 everywhere: nothing to prefer.
    """

    name: str = "lora-affinity-scorer"
    type: str = "lora-affinity-scorer"

    def score(self, request: InferenceRequest, c: Candidates) -> list[float]:
        target = request.target_model
        out = []
        for m in c.metrics:
            if m is None:
                out.append(0.0)
            elif target in m.active_adapters:
                out.append(1.0)
            elif m.max_lora and len(m.active_adapters) + len(m.waiting_adapters) < m.max_lora:
                out.append(0.8)
            elif target in m.waiting_adapters:
                out.append(0.6)
            else:
                out.append(0.0)
        return out


@dataclass
class PrefixCacheScorer:
    """Fraction of the prompt's leading blocks the endpoint is believed to hold."""

    name: str = "prefix-cache-scorer"
    type: str = "prefix-cache-scorer"

    def score(self, request: InferenceRequest, c: Candidates) -> list[float]:
        return list(c.prefix_match)


@dataclass
class PrecisePrefixCacheScorer:
    """Longest run of the prompt's leading blocks a pod *reports* holding (its KV events), over
    the prompt's full blocks; the approximate index's match for pods that publish nothing.

    The pods' reports come from ``index`` (the KV-event index, bound by ``build_scheduler``);
    the prompt's blocks are named by ``keys`` (``blockkeys``), cut at each pod's own block
    size.  Unlike the approximate index, this knows about evictions, restarts, traffic that
    bypassed epp and other epp replicas' picks.  Wrapped in ``GuardedAffinityScorer`` (the
    ``affinityMaxExtraLoad`` parameter) it never piles work onto a saturated pod.

    An adapter's cached blocks help only where the adapter can run: for a request whose adapter
    some candidate reports (running or waiting), a pod's match is scaled by its LoRA state
    (``lora_gate``: running 1, a free slot 0.8, waiting 0.6, none 0.25).  The approximate index
    needs no such gate (it holds only epp's own picks, which follow LoRA affinity already); the
    pods' reports also show blocks that other traffic left where the adapter is gone.

    After each pick (:meth:`pre_request`) the primary is credited with the prompt's blocks as
    *speculative* entries for ``speculative_ttl`` seconds (0: off), covering the time until the
    pod's own events report them.
    """

    keys: BlockKeys = field(default_factory=BlockKeys)
    index: BlockLookup | None = None
    speculative_ttl: float = 2.0
    lora_gate: bool = True
    name: str = "precise-prefix-cache-scorer"
    type: str = "precise-prefix-cache-scorer"

    def _keys(self, request: InferenceRequest, c: Candidates, block_size: int) -> list[int] | None:
        """The prompt's keys at ``block_size``; None when its token ids are not known (a server
        tokenizer's answer did not come, or a tokenizer raised ``TokensPending``)."""
        slot = ("precise-keys", id(self.keys), block_size)
        cached = c.cache.get(slot, _MISSING)
        if cached is not _MISSING:
            return cast("list[int] | None", cached)
        keys: list[int] | None
        chain, tokenizer = self.keys, self.keys.tokenizer
        if isinstance(tokenizer, ServerTokenizer):
            ids = tokenizer.ids_for(request)
            keys = None if ids is None else chain.id_keys(ids, request.target_model, block_size)
        else:
            try:
                keys = chain.prompt_keys(chain.request_text(request.prompt, request.messages), request.target_model,
                                         block_size)  # fmt: skip
            except TokensPending:
                keys = None
        c.cache[slot] = keys
        return keys

    def score(self, request: InferenceRequest, c: Candidates) -> list[float]:
        index = self.index
        if index is None or not request.prompt:
            return list(c.prefix_match)
        out = []
        for e, approx in zip(c.endpoints, c.prefix_match, strict=True):
            block_size = index.block_size(e.address)
            if block_size is None:  # publishes nothing: what epp itself sent there
                out.append(approx)
                continue
            keys = self._keys(request, c, block_size)
            if keys is None:  # token ids unknown: what epp itself sent there
                out.append(approx)
                continue
            out.append(index.leading_run(e.address, keys) / len(keys) if keys else 0.0)
        return _lora_gate(request, c, out) if self.lora_gate else out

    def tokenize_need(self, request: InferenceRequest) -> TokenizeNeed | None:
        """The ``/tokenize`` call this request needs first (a server tokenizer, bound to KV events)."""
        tokenizer = self.keys.tokenizer
        if self.index is None or not isinstance(tokenizer, ServerTokenizer):
            return None
        return tokenizer.need(request)

    def pre_request(self, request: InferenceRequest, c: Candidates, picked: int) -> None:
        """The request goes to ``c.endpoints[picked]``: enter its blocks there speculatively."""
        index = self.index
        if index is None or self.speculative_ttl <= 0 or not request.prompt:
            return
        address = c.endpoints[picked].address
        block_size = index.block_size(address)
        if block_size is not None:
            keys = self._keys(request, c, block_size)
            if keys:
                index.speculate(address, keys, self.speculative_ttl)


_LORA = LoraAffinityScorer()
_LORA_FLOOR = 0.25  # a pod where the adapter cannot run soon still keeps a quarter of its match


def _lora_gate(request: InferenceRequest, c: Candidates, scores: list[float]) -> list[float]:
    """Scale each match by the pod's LoRA-affinity score (``LoraAffinityScorer``: running 1, a
    free slot 0.8, waiting 0.6, none 0), floored at ``_LORA_FLOOR``; pods without fresh metrics
    keep their match."""
    target = request.target_model
    if not any(m is not None and (target in m.active_adapters or target in m.waiting_adapters) for m in c.metrics):
        return scores  # the base model, or an adapter no candidate has: nothing to weigh
    lora = _LORA.score(request, c)
    return [s if m is None else s * max(w, _LORA_FLOOR) for s, w, m in zip(scores, lora, c.metrics, strict=True)]


def bind_block_lookup(scorers: Iterable[Any], index: BlockLookup | None) -> int:
    """Give every precise prefix scorer among ``scorers`` (bare or guarded) the KV-event index;
    returns how many were bound."""
    bound = 0
    for s in scorers:
        inner = s.inner if isinstance(s, GuardedAffinityScorer) else s
        if isinstance(inner, PrecisePrefixCacheScorer):
            inner.index = index
            bound += 1
    return bound


@dataclass
class InflightLoadScorer:
    """epp's own view of load, exact between scrapes: requests and prompt tokens it has
    sent to each endpoint and not yet seen finish.

    ``load = inflight_requests + inflight_tokens / tokens_per_request`` (a 6k-token
    prompt weighs like several short ones); ``score = 1 - (load - min_load) / load_scale``,
    floored at 0.  An absolute scale, not min-max: one extra request costs
    ``1/load_scale`` of the weight, so affinity can still outweigh a small imbalance
    (min-max would make a one-request difference as decisive as a hundred).  With
    several epp replicas each sees only its share, which is why the default profile
    also weighs the scraped queue.
    """

    name: str = "inflight-load-scorer"
    type: str = "inflight-load-scorer"
    tokens_per_request: float = 2048.0
    load_scale: float = 8.0

    def score(self, request: InferenceRequest, c: Candidates) -> list[float]:
        load = load_of(c, self.tokens_per_request)
        if not load:
            return []
        floor, scale = min(load), self.load_scale
        return [max(0.0, 1.0 - (ld - floor) / scale) for ld in load]


def load_of(c: Candidates, tokens_per_request: float = 2048.0) -> list[float]:
    """All of epp's in-flight work per endpoint, in request units."""
    return [r + t / tokens_per_request for r, t in zip(c.inflight, c.inflight_tokens, strict=True)]


def estimated_queue(c: Candidates, tokens_per_request: float = 2048.0) -> list[float]:
    """The waiting queue as it probably is now: the last scrape's, plus what epp sent since.

    Without fresh metrics, everything epp has in flight there counts as queued.  Computed
    once per decision and token scale (scorers and guards share it).
    """
    key = ("estimated_queue", tokens_per_request)
    cached = c.cache.get(key)
    if cached is not None:
        return cast(list[float], cached)
    unseen = c.unseen or [0] * len(c)
    unseen_tokens = c.unseen_tokens or [0] * len(c)
    out = []
    for m, r, t, u, ut in zip(c.metrics, c.inflight, c.inflight_tokens, unseen, unseen_tokens, strict=True):
        if m is None:
            out.append(r + t / tokens_per_request)
        else:
            out.append(m.waiting + u + ut / tokens_per_request)
    c.cache[key] = out
    return out


@dataclass
class EstimatedQueueScorer:
    """Anti-herding queue score: ``1 - (q - min_q) / queue_scale`` on the estimated queue.

    Scraped gauges lag by up to one scrape interval; a burst between two scrapes would
    all see the same "shortest" queue.  Adding the requests (and prompt tokens) epp sent
    since each endpoint's last scrape closes that gap.  The absolute scale keeps one
    queued request worth ``1/queue_scale`` of the weight, comparable across loads.
    """

    name: str = "estimated-queue-scorer"
    type: str = "estimated-queue-scorer"
    tokens_per_request: float = 2048.0
    queue_scale: float = 4.0

    def score(self, request: InferenceRequest, c: Candidates) -> list[float]:
        q = estimated_queue(c, self.tokens_per_request)
        if not q:
            return []
        floor, scale = min(q), self.queue_scale
        return [max(0.0, 1.0 - (x - floor) / scale) for x in q]


@dataclass
class GuardedAffinityScorer:
    """Wraps an affinity scorer (prefix, LoRA) so it cannot pile work onto a hot endpoint.

    An endpoint whose estimated queue exceeds the shortest candidate queue by more than
    ``max_extra_load`` gets its affinity score scaled down linearly, to 0 at twice that
    margin; one whose KV cache is nearly full (``kv_limit``) too, since more work there
    means preemptions.  Affinity decides between comparably loaded endpoints but never
    overrides a large imbalance: the hot-spotting users report with cache-aware routers.
    """

    inner: PrefixCacheScorer | LoraAffinityScorer | PrecisePrefixCacheScorer
    max_extra_load: float = 4.0
    kv_limit: float = 0.95
    name: str = ""
    type: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.inner.name
        self.type = self.type or self.inner.type

    def score(self, request: InferenceRequest, c: Candidates) -> list[float]:
        raw = self.inner.score(request, c)
        cap = self.max_extra_load
        if cap <= 0 or not raw or not any(raw):
            return raw
        q = estimated_queue(c)
        floor = min(q)
        out = []
        for s, x, m in zip(raw, q, c.metrics, strict=True):
            extra = x - floor - cap
            v = s * max(0.0, 1.0 - extra / cap) if extra > 0 else s
            if m is not None and m.kv_usage >= self.kv_limit:
                v *= 0.5
            out.append(v)
        return out


def clamp(scores: Sequence[float]) -> list[float]:
    return [0.0 if s < 0 else 1.0 if s > 1 else s for s in scores]
