"""The scheduler (``epp/scheduling/scheduler.py``): admission, the built-in profiles' decisions,
fallbacks, plugin timings and candidate sampling."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

import pytest

from epp.domain import Criticality, Endpoint
from epp.errors import Shed
from epp.scheduling import build_scheduler

from support import datastore
from support.scheduling import EPS, NOW, m, req, store_with


@pytest.mark.parametrize(
    ("crit", "metrics", "shed"),
    [
        (Criticality.SHEDDABLE, [m(waiting=9), m(kv=0.95)], True),
        (Criticality.SHEDDABLE, [m(waiting=9), None], True),  # stale metrics count as saturated
        (Criticality.SHEDDABLE, [m(waiting=1), m(kv=0.3)], False),
        (Criticality.STANDARD, [m(waiting=9), m(kv=0.95)], False),
        (Criticality.CRITICAL, [m(waiting=9), m(kv=0.95)], False),
    ],
    ids=["sheddable-saturated", "sheddable-stale", "sheddable-idle", "standard-saturated", "critical-saturated"],
)
def test_shedding_by_criticality(crit, metrics, shed):
    store = store_with(metrics)
    sched = build_scheduler("epp-default", store)
    if shed:
        with pytest.raises(Shed):
            sched.admit(req(crit=crit), EPS[:2])
    else:
        sched.admit(req(crit=crit), EPS[:2])
        assert sched.schedule(req(crit=crit), EPS[:2])


def test_epp_default_follows_prefix_affinity_until_the_endpoint_is_hot():
    store = store_with([m(), m(), m()])
    sched = build_scheduler("epp-default", store, rng=random.Random(5))
    prompt = "You are a helpful assistant. " * 40
    first = sched.schedule(req(prompt=prompt + "q1"), EPS[:3])[0]
    tickets = []
    for i in range(3):  # comparable load: the shared prefix keeps landing on the same endpoint
        tickets.append(store.load.acquire(first, 200))
        assert sched.schedule(req(prompt=prompt + f"q{i + 2}"), EPS[:3])[0] == first
    for _ in range(8):  # the holder gets hot: the guard lets load win
        tickets.append(store.load.acquire(first, 200))
    assert sched.schedule(req(prompt=prompt + "q9"), EPS[:3])[0] != first


def test_gie_default_piles_onto_the_prefix_holder_regardless_of_own_inflight():
    store = store_with([m(), m(), m()])
    sched = build_scheduler("gie-default", store, rng=random.Random(5))
    prompt = "You are a helpful assistant. " * 40
    first = sched.schedule(req(prompt=prompt + "q1"), EPS[:3])[0]
    for _ in range(11):
        store.load.acquire(first, 200)  # invisible to the reference profile until the next scrape
    assert sched.schedule(req(prompt=prompt + "q9"), EPS[:3])[0] == first


def test_lora_affinity_prefers_the_endpoint_with_the_adapter_loaded():
    store = store_with([m(active=["sql-lora"]), m(active=["b", "c", "d", "e"]), m()])
    sched = build_scheduler("epp-default", store)
    picks = Counter(sched.schedule(req("sql-lora"), EPS[:3])[0].name for _ in range(20))
    assert picks == {"pod-0": 20}


def test_fallbacks_follow_the_ranking():
    store = store_with([m(waiting=4), m(waiting=0), m(waiting=2)])
    sched = build_scheduler("gie-default", store, max_endpoints=3)
    assert [e.name for e in sched.schedule(req(), EPS[:3])] == ["pod-1", "pod-2", "pod-0"]


def test_plugin_timings_are_observed():
    seen: list[tuple[str, str, str, float]] = []

    def timer(point: str, type_: str, name: str) -> Callable[[float], None]:
        return lambda seconds: seen.append((point, type_, name, seconds))

    store = store_with([m(), m()])
    sched = build_scheduler("epp-default", store, observe=timer)
    assert seen == []  # timers are resolved when the scheduler is built, observed per decision
    sched.schedule(req(prompt="z" * 200), EPS[:2])
    plugins = [s[:3] for s in seen]
    assert ("Scorer", "prefix-cache-scorer", "prefix-cache-scorer") in plugins
    assert ("Picker", "max-score-picker", "max-score-picker") in plugins
    assert len(seen) == 5 and all(0 <= s[3] < 1 for s in seen)  # 4 scorers (the sampler is no plugin here) + picker
    sched.schedule(req(prompt="z" * 200), EPS[:2])
    assert len(seen) == 10


def test_large_pools_are_sampled_but_affinity_endpoints_always_compete():
    many = [Endpoint(f"127.0.1.{i}:8000", f"p{i}") for i in range(100)]
    store = datastore(many, clock=lambda: NOW)
    for i, e in enumerate(many):
        store.set_metrics(e.address, m(waiting=0, active=["sql-lora"] if i == 77 else ()))
    sched = build_scheduler("epp-default", store, rng=random.Random(3))
    sched._max_candidates = 8  # 2 prefix holders, 2 adapter holders, the rest random
    prompt = "shared system prompt " * 30
    first = sched.schedule(req(prompt=prompt + "a"), many)[0]
    # the prefix holder is always among the candidates, so affinity keeps working at scale
    assert all(sched.schedule(req(prompt=prompt + f"q{i}"), many)[0] == first for i in range(20))
    assert sched.sample(req("sql-lora"), many, [])[0].name == "p77"
    assert len(sched.sample(req(), many, [])) == 8


def test_out_of_range_scores_are_clamped_wherever_a_nan_sits():
    from epp.scheduling.profile import SchedulerProfile
    from epp.scheduling.scheduler import Scheduler

    class Fixed:
        name = type = "fixed"

        def __init__(self, scores: list[float]) -> None:
            self.scores = scores

        def score(self, request: object, c: object) -> list[float]:
            return list(self.scores)

    class Recording:
        name = type = "recording"

        def pick(self, c: object, scores: list[float], k: int) -> list[int]:
            self.seen = list(scores)
            return [0]

    store = store_with([m(), m(), m()])
    nan = float("nan")
    for raw, clamped in (([nan, -0.2, 1.7], [None, 0.0, 1.0]), ([0.5, nan, -3.0], [0.5, None, 0.0])):
        picker = Recording()
        profile = SchedulerProfile(name="t", scorers=[(Fixed(raw), 2.0)], picker=picker)
        Scheduler(profile, store).schedule(req(), EPS[:3])
        for got, want in zip(picker.seen, clamped, strict=True):
            assert math.isnan(got) if want is None else got == 2.0 * want  # NaN stays NaN, as clamp leaves it
