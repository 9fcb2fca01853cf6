"""The scheduler seam and the placeholder policy.

``Scheduler.schedule`` returns candidates best-first; routing keeps the first as the
primary and the next ones as fallbacks.  The placeholder policy ranks by fewest
in-flight requests (epp's own view), breaking ties at random; a later issue replaces
it with filter → scorer → picker profiles behind the same seam.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from epp.domain import Endpoint, InferenceRequest


class LoadView(Protocol):
    def inflight(self, address: str) -> int: ...


class Scheduler(Protocol):
    def schedule(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[Endpoint]: ...


class LeastInflightScheduler:
    """Fewest in-flight requests first; random among equals."""

    name = "least-inflight"

    def __init__(self, load: LoadView, rng: random.Random | None = None) -> None:
        self._load = load
        self._rng = rng or random.Random()

    def schedule(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[Endpoint]:
        inflight = self._load.inflight
        rand = self._rng.random
        return sorted(candidates, key=lambda e: (inflight(e.address), rand()))
