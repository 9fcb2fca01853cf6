"""The scheduler seam and the placeholder policy.

``Scheduler.schedule`` returns candidates best-first; routing keeps the first as the
primary and the next ones as fallbacks.  The placeholder policy ranks by fewest
in-flight requests (epp's own view), breaking ties at random; a later issue replaces
it with filter → scorer → picker profiles behind the same seam.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Protocol

from epp.domain import Endpoint, InferenceRequest


class LoadView(Protocol):
    def inflight_counts(self) -> Mapping[str, int]: ...


class Scheduler(Protocol):
    def schedule(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[Endpoint]: ...


class LeastInflightScheduler:
    """Fewest in-flight requests first; random among equals."""

    name = "least-inflight"

    def __init__(self, load: LoadView, rng: random.Random | None = None) -> None:
        self._load = load
        self._rng = rng or random.Random()

    def schedule(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[Endpoint]:
        # Rotate by a random offset, then stable-sort by count: the primary is uniform
        # among the least-loaded endpoints, at one random draw per decision instead of
        # one per endpoint, and the sort key is a C-level lookup (no per-item Python call).
        n = len(candidates)
        if n == 0:
            return []
        off = self._rng.randrange(n)
        rotated = [*candidates[off:], *candidates[:off]]
        get = self._load.inflight_counts().get
        keys = [get(e.address, 0) for e in rotated]
        return [rotated[i] for i in sorted(range(n), key=keys.__getitem__)]


def build_scheduler(
    profile: str, load: LoadView, *, rng: random.Random | None = None, clock: object = None
) -> Scheduler:
    """A scheduler for a built-in profile name (placeholder: every name is least-in-flight for now)."""
    return LeastInflightScheduler(load, rng)
