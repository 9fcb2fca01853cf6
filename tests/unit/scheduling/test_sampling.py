"""Candidate sampling is a profile's choice; admission and the mirror pick see whole pools."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from epp.domain import Criticality, Endpoint, EndpointMetrics, InferenceRequest
from epp.errors import Shed
from epp.routing import Router
from epp.scheduling import build_scheduler, parse_config

from support import datastore

NOW = 100.0
MANY = tuple(Endpoint(f"127.0.{i // 200}.{i % 200 + 1}:8000", f"pod-{i}") for i in range(100))


def req(crit: Criticality = Criticality.STANDARD, prompt: str = "") -> InferenceRequest:
    return InferenceRequest(request_id="r", model="m", target_model="m", prompt=prompt, criticality=crit)


def busy_store(waiting: list[int], endpoints=MANY, **kw):
    store = datastore(endpoints, clock=lambda: NOW, **kw)
    for e, w in zip(endpoints, waiting, strict=True):
        store.set_metrics(e.address, EndpointMetrics(waiting=w, updated_at=NOW))
    return store


def test_round_robin_visits_every_endpoint_of_a_large_pool():
    store = busy_store([0] * 100)
    sched = build_scheduler("round-robin", store, rng=random.Random(1))
    assert sched.profile.max_candidates is None
    assert len({sched.schedule(req(), MANY)[0] for _ in range(100)}) == 100


def test_least_inflight_finds_the_one_idle_endpoint_among_a_hundred():
    store = busy_store([0] * 100)
    idle = MANY[63]
    for e in MANY:
        if e is not idle:
            store.load.acquire(e)
    sched = build_scheduler("least-inflight", store, rng=random.Random(1))
    assert all(sched.schedule(req(), MANY)[0] == idle for _ in range(20))


@pytest.mark.parametrize("profile", ["epp-default"])
def test_sampled_profiles_score_at_most_their_budget(profile):
    store = busy_store([0] * 100)
    seen: list[int] = []
    sched = build_scheduler(profile, store, rng=random.Random(1))
    scorer = sched.profile.scorers[0][0]
    score = scorer.score

    def counting(request, c):
        seen.append(len(c))
        return score(request, c)

    scorer.score = counting  # type: ignore[method-assign]
    sched.schedule(req(), MANY)
    assert sched.profile.max_candidates == 16 and seen == [16]


def test_a_seeded_scheduler_decides_reproducibly_above_the_sampling_threshold():
    def picks(seed: int) -> list[str]:
        store = busy_store([i % 7 for i in range(100)])
        sched = build_scheduler("epp-default", store, rng=random.Random(seed))
        return [sched.schedule(req(prompt=f"prompt {i} " * 30), MANY)[0].name for i in range(50)]

    assert picks(11) == picks(11)
    assert picks(11) != picks(12)


@pytest.mark.parametrize(("saturated", "shed"), [(90, True), (10, False)])
def test_saturation_is_judged_on_the_whole_pool(saturated, shed):
    waiting = [6] * saturated + [0] * (100 - saturated)
    for seed in range(5):  # whatever a 16-endpoint sample would have shown
        store = busy_store(waiting)
        sched = build_scheduler("epp-default", store, rng=random.Random(seed))
        if shed:
            with pytest.raises(Shed):
                sched.admit(req(Criticality.SHEDDABLE), MANY)
        else:
            sched.admit(req(Criticality.SHEDDABLE), MANY)


def test_the_fallback_count_comes_from_the_flag_unless_the_picker_sets_it():
    store = busy_store([0] * 100)
    assert len(build_scheduler("gie-default", store, max_endpoints=3).schedule(req(), MANY)) == 3
    config = parse_config("""
plugins:
- {type: queue-scorer}
- {type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}
""")
    assert len(build_scheduler(config, store, max_endpoints=5).schedule(req(), MANY)) == 2


def test_the_mirror_pick_is_least_loaded_counts_its_copies_and_avoids_stale_pods():
    primary = MANY[:2]
    shadows = (Endpoint("127.0.9.1:8000", "s0"), Endpoint("127.0.9.2:8000", "s1"), Endpoint("127.0.9.3:8000", "s2"))
    store = datastore(primary, mirror=shadows, clock=lambda: NOW)
    store.set_metrics(shadows[0].address, EndpointMetrics(waiting=2, running=1, updated_at=NOW))
    store.set_metrics(shadows[1].address, EndpointMetrics(waiting=0, running=3, updated_at=NOW))
    store.set_metrics(shadows[2].address, EndpointMetrics(waiting=0, running=0, updated_at=NOW - 60))  # stale
    rng = random.Random(4)
    router = Router(
        store,
        build_scheduler("round-robin", store, rng=rng),
        mirror_scheduler=build_scheduler("least-loaded", store, rng=rng),
    )
    picks = [router.route(req()).mirror for _ in range(4)]
    # s1 has the shortest queue; each copy sent there counts until the next scrape,
    # so after two copies s0 (2 waiting, 1 running) ties on queue and wins on running
    assert [p.name if p else None for p in picks][:2] == ["s1", "s1"]
    assert Counter(p.name for p in picks if p) == {"s1": 3, "s0": 1}
    assert store.load.unseen[shadows[1].address] == 3 and shadows[2].address not in store.load.unseen
