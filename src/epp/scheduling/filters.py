"""Filters: narrow the candidates before scoring (``filter`` returns the indices to keep).

A filter never empties the candidates: when nothing would pass, it keeps them all, so a
pool whose every pod went stale still serves (round-robin-like) rather than failing.
"""

from __future__ import annotations

from dataclasses import dataclass

from epp.domain import InferenceRequest
from epp.scheduling.base import Candidates


@dataclass
class FreshMetricsFilter:
    """Keeps endpoints whose last scrape is fresh (all of them when none is)."""

    name: str = "fresh-metrics-filter"
    type: str = "fresh-metrics-filter"

    def filter(self, request: InferenceRequest, c: Candidates) -> list[int]:
        keep = [i for i, m in enumerate(c.metrics) if m is not None]
        return keep or list(range(len(c)))
