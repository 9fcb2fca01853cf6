"""Saturation: is the pool too busy to take work that may be dropped?

``utilization-detector`` (the reference default): the mean over the whole pool (never a
sample of it) of ``max(queue / queue_threshold, kv / kv_threshold)``, an endpoint
without fresh metrics counting 1.0; saturated at ≥ 1.0.  Listed in a profile it also acts as a filter: it
drops stale endpoints and those over ``threshold x (1 + headroom)``, unless that would
drop everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.domain import EndpointMetrics, InferenceRequest
from epp.scheduling.base import Candidates


@dataclass
class UtilizationDetector:
    name: str = "utilization-detector"
    type: str = "utilization-detector"
    queue_threshold: float = 5.0
    kv_threshold: float = 0.8
    headroom: float = 0.0

    def saturation(self, metrics: Sequence[EndpointMetrics | None]) -> float:
        """Saturation of a pool given each endpoint's fresh metrics (None: stale or unknown)."""
        if not metrics:
            return 1.0
        qt, kt = self.queue_threshold, self.kv_threshold
        total = 0.0
        for m in metrics:
            total += 1.0 if m is None else max(m.waiting / qt, m.kv_usage / kt)
        return total / len(metrics)

    def filter(self, request: InferenceRequest, c: Candidates) -> list[int]:
        qmax = self.queue_threshold * (1 + self.headroom)
        kmax = self.kv_threshold * (1 + self.headroom)
        keep = [i for i, m in enumerate(c.metrics) if m is not None and m.waiting < qmax and m.kv_usage < kmax]
        return keep or list(range(len(c)))
