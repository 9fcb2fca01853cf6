"""Pickers (``epp/scheduling/pickers.py``): choose among scored candidates."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from epp.scheduling.pickers import MaxScorePicker, RoundRobinPicker, WeightedRandomPicker

from support.scheduling import cands, m


def test_max_score_picker_breaks_ties_at_random_and_orders_fallbacks():
    picker = MaxScorePicker(rng=random.Random(1))
    c = cands([m()] * 4)
    firsts = Counter(picker.pick(c, [0.5, 0.9, 0.9, 0.1], 1)[0] for _ in range(1000))
    assert set(firsts) == {1, 2} and abs(firsts[1] - 500) < 4.5 * math.sqrt(250)
    assert picker.pick(c, [0.5, 0.9, 0.2, 0.1], 3) == [1, 0, 2]


@pytest.mark.parametrize("n", [2, 9, 64, 65, 300])  # sorted in full up to 64 candidates, heapq above
def test_max_score_picker_fallbacks_are_the_next_best_with_ties_rotated_at_random(n: int):
    rng = random.Random(n)
    scores = [rng.choice([0.1, 0.4, 0.4, 0.7, 0.9]) for _ in range(n)]
    picker = MaxScorePicker(rng=random.Random(7))
    mirror = random.Random(7)  # replays the picker's draws: the primary's tie-break, then the rotation
    c = cands([m()] * n)
    for _ in range(50):
        got = picker.pick(c, scores, 4)
        ties = [i for i, s in enumerate(scores) if s == max(scores)]
        primary = ties[0] if len(ties) == 1 else mirror.choice(ties)
        off = mirror.randrange(n)
        rotated = [i for i in [*range(off, n), *range(off)] if i != primary]
        assert got == [primary, *sorted(rotated, key=lambda i: -scores[i])[:3]]
    fallback_firsts = Counter(picker.pick(c, [1.0] + [0.5] * (n - 1), 2)[1] for _ in range(400))
    assert len(fallback_firsts) > min(n - 1, 8) // 2  # tied fallbacks are not always the same endpoint


def test_weighted_random_picker_is_proportional():
    picker = WeightedRandomPicker(rng=random.Random(2))
    c = cands([m()] * 3)
    picks = Counter(picker.pick(c, [0.2, 0.6, 0.0], 1)[0] for _ in range(2000))
    assert picks[2] == 0 and abs(picks[0] - 500) < 4.5 * math.sqrt(2000 * 0.25 * 0.75)


def test_round_robin_cycles():
    p = RoundRobinPicker()
    c = cands([m()] * 3)
    assert [p.pick(c, [0, 0, 0], 1)[0] for _ in range(5)] == [0, 1, 2, 0, 1]
