"""The plugin surface: what filters, scorers and pickers see and return.

A decision works on one :class:`Candidates` snapshot: parallel tuples (one slot per
endpoint) of what epp knows at that instant: scraped metrics (``None`` when missing
or stale, which scorers treat as worst), epp's own in-flight requests and tokens, and
the prefix-cache match.  Parallel sequences rather than per-endpoint objects keep a
500-endpoint decision in list comprehensions instead of attribute walks.

* ``Filter.filter(request, c) -> list[int]``: indices of endpoints to keep.
* ``Scorer.score(request, c) -> list[float]``: one score per endpoint, clamped to 0..1
  by the profile, then weighted.
* ``Picker.pick(c, scores, k) -> list[int]``: up to ``k`` indices, best first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from epp.domain import Endpoint, EndpointMetrics, InferenceRequest


@dataclass(frozen=True, slots=True)
class Candidates:
    endpoints: Sequence[Endpoint]
    metrics: Sequence[EndpointMetrics | None]  # None: no fresh scrape
    inflight: Sequence[int]
    inflight_tokens: Sequence[int]
    prefix_match: Sequence[float]  # fraction of the prompt's leading blocks the endpoint is believed to hold
    unseen: Sequence[int] = ()  # requests sent since the endpoint's last scrape (its gauges lag them)
    unseen_tokens: Sequence[int] = ()
    cache: dict[object, object] = field(default_factory=dict, compare=False)  # per-decision derived values

    def __len__(self) -> int:
        return len(self.endpoints)

    def subset(self, keep: Sequence[int]) -> Candidates:
        return Candidates(
            endpoints=[self.endpoints[i] for i in keep],
            metrics=[self.metrics[i] for i in keep],
            inflight=[self.inflight[i] for i in keep],
            inflight_tokens=[self.inflight_tokens[i] for i in keep],
            prefix_match=[self.prefix_match[i] for i in keep],
            unseen=[self.unseen[i] for i in keep] if self.unseen else (),
            unseen_tokens=[self.unseen_tokens[i] for i in keep] if self.unseen_tokens else (),
        )


class Filter(Protocol):
    name: str
    type: str

    def filter(self, request: InferenceRequest, c: Candidates) -> list[int]: ...


class Scorer(Protocol):
    name: str
    type: str

    def score(self, request: InferenceRequest, c: Candidates) -> list[float]: ...


class Picker(Protocol):
    name: str
    type: str

    def pick(self, c: Candidates, scores: Sequence[float], k: int) -> list[int]: ...


def min_max_low_is_best(values: Sequence[float]) -> list[float]:
    """``(max - v) / (max - min)``; all equal → 1.0 (the reference queue-scorer formula)."""
    if not values:
        return []
    hi, lo = max(values), min(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]
