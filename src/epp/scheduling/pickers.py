"""Pickers: turn weighted scores into up to ``k`` endpoints, best first."""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from epp.scheduling.base import Candidates

_SORT_ALL = 64  # up to this many candidates, sorting them all beats heapq.nlargest's generator


@dataclass
class MaxScorePicker:
    """Highest total score first; ties broken at random."""

    name: str = "max-score-picker"
    type: str = "max-score-picker"
    rng: random.Random = field(default_factory=random.Random)

    def pick(self, c: Candidates, scores: Sequence[float], k: int) -> list[int]:
        n = len(scores)
        if n == 0:
            return []
        best = max(scores)
        ties = [i for i, s in enumerate(scores) if s == best]
        primary = ties[0] if len(ties) == 1 else self.rng.choice(ties)  # uniform among the best
        if k == 1:
            return [primary]
        # fallbacks: the next best, ties in a randomly rotated order (one draw, not one per endpoint)
        off = self.rng.randrange(n)
        if n > _SORT_ALL:
            rest = (i for i in itertools.chain(range(off, n), range(off)) if i != primary)
            return [primary, *heapq.nlargest(k - 1, rest, key=scores.__getitem__)]
        order = [*range(off, n), *range(off)]  # a stable sort keeps the rotation among ties, as nlargest does
        order.remove(primary)
        order.sort(key=scores.__getitem__, reverse=True)
        return [primary, *order[: k - 1]]


@dataclass
class RandomPicker:
    """Uniformly random, ignoring scores."""

    name: str = "random-picker"
    type: str = "random-picker"
    rng: random.Random = field(default_factory=random.Random)

    def pick(self, c: Candidates, scores: Sequence[float], k: int) -> list[int]:
        return self.rng.sample(range(len(scores)), min(k, len(scores)))


@dataclass
class WeightedRandomPicker:
    """Random with probability proportional to score (A-Res: key = U^(1/score)); all zero → uniform."""

    name: str = "weighted-random-picker"
    type: str = "weighted-random-picker"
    rng: random.Random = field(default_factory=random.Random)

    def pick(self, c: Candidates, scores: Sequence[float], k: int) -> list[int]:
        rand = self.rng.random
        if not any(s > 0 for s in scores):
            return self.rng.sample(range(len(scores)), min(k, len(scores)))
        keys = [rand() ** (1.0 / s) if s > 0 else -1.0 for s in scores]
        return heapq.nlargest(k, range(len(keys)), key=keys.__getitem__)


@dataclass
class RoundRobinPicker:
    """Cycles through the candidates in address order, like a plain Kubernetes Service."""

    name: str = "round-robin-picker"
    type: str = "round-robin-picker"
    _next: int = 0

    def pick(self, c: Candidates, scores: Sequence[float], k: int) -> list[int]:
        n = len(scores)
        if n == 0:
            return []
        start = self._next % n
        self._next += 1
        return [(start + i) % n for i in range(min(k, n))]
