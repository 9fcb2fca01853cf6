"""Pickers (``epp/scheduling/pickers.py``): choose among scored candidates."""

from __future__ import annotations

import math
import random
from collections import Counter

from epp.scheduling.pickers import MaxScorePicker, RoundRobinPicker, WeightedRandomPicker

from support.scheduling import cands, m


def test_max_score_picker_breaks_ties_at_random_and_orders_fallbacks():
    picker = MaxScorePicker(rng=random.Random(1))
    c = cands([m()] * 4)
    firsts = Counter(picker.pick(c, [0.5, 0.9, 0.9, 0.1], 1)[0] for _ in range(1000))
    assert set(firsts) == {1, 2} and abs(firsts[1] - 500) < 4.5 * math.sqrt(250)
    assert picker.pick(c, [0.5, 0.9, 0.2, 0.1], 3) == [1, 0, 2]


def test_weighted_random_picker_is_proportional():
    picker = WeightedRandomPicker(rng=random.Random(2))
    c = cands([m()] * 3)
    picks = Counter(picker.pick(c, [0.2, 0.6, 0.0], 1)[0] for _ in range(2000))
    assert picks[2] == 0 and abs(picks[0] - 500) < 4.5 * math.sqrt(2000 * 0.25 * 0.75)


def test_round_robin_cycles():
    p = RoundRobinPicker()
    c = cands([m()] * 3)
    assert [p.pick(c, [0, 0, 0], 1)[0] for _ in range(5)] == [0, 1, 2, 0, 1]
