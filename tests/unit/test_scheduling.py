"""Scheduling plugins, profiles, admission and the prefix index."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

import epp.scheduling
from epp.datalayer import Datastore
from epp.domain import Criticality, Endpoint, EndpointMetrics, InferenceRequest, ModelPolicy
from epp.errors import ConfigError, Shed
from epp.routing import Router
from epp.scheduling import Candidates, build_scheduler, parse_config
from epp.scheduling.pickers import MaxScorePicker, RoundRobinPicker, WeightedRandomPicker
from epp.scheduling.prefix import PrefixIndex, block_hashes
from epp.scheduling.profile import build_profile
from epp.scheduling.saturation import UtilizationDetector
from epp.scheduling.scorers import (
    EstimatedQueueScorer,
    GuardedAffinityScorer,
    InflightLoadScorer,
    KvCacheScorer,
    LoraAffinityScorer,
    PrefixCacheScorer,
    QueueScorer,
    RunningRequestsScorer,
)

from support import datastore

EPS = [Endpoint(f"127.0.0.{i + 1}:8000", f"pod-{i}") for i in range(4)]
NOW = 100.0


def req(model: str = "base", prompt: str = "", crit: Criticality = Criticality.STANDARD, **kw) -> InferenceRequest:
    return InferenceRequest(request_id="r", model=model, target_model=model, prompt=prompt, criticality=crit, **kw)


def m(waiting=0, running=0, kv=0.0, active=(), pending=(), max_lora=4, blocks=1000) -> EndpointMetrics:
    return EndpointMetrics(waiting=waiting, running=running, kv_usage=kv, active_adapters=frozenset(active),
                           waiting_adapters=frozenset(pending), max_lora=max_lora, block_size=16,
                           num_blocks=blocks, updated_at=NOW)


def cands(metrics, inflight=None, tokens=None, prefix=None, unseen=None) -> Candidates:
    n = len(metrics)
    return Candidates(EPS[:n], metrics, inflight or [0] * n, tokens or [0] * n, prefix or [0.0] * n,
                      unseen or [0] * n, [0] * n)


def test_exports_are_sorted_and_complete():
    exported = epp.scheduling.__all__
    assert len(set(exported)) == len(exported) and all(hasattr(epp.scheduling, n) for n in exported)
    for name in ("Filter", "Scorer", "Picker", "Scheduler", "SchedulerProfile", "build_scheduler"):
        assert name in epp.scheduling.__all__


@pytest.mark.parametrize(
    ("scorer", "metrics", "expected"),
    [
        (QueueScorer(), [m(waiting=0), m(waiting=5), m(waiting=10)], [1.0, 0.5, 0.0]),
        (QueueScorer(), [m(waiting=3), m(waiting=3)], [1.0, 1.0]),
        (QueueScorer(), [m(waiting=3), None], [1.0, 0.0]),
        (RunningRequestsScorer(), [m(running=2), m(running=6)], [1.0, 0.0]),
        (KvCacheScorer(), [m(kv=0.25), m(kv=1.0), None], [0.75, 0.0, 0.0]),
        (LoraAffinityScorer(), [m(active=["a"]), m(active=["b"]), m(active=["b", "c", "d", "e"], pending=["a"]),
                                m(active=["b", "c", "d", "e"]), None][:4], [1.0, 0.8, 0.6, 0.0]),
    ],
    ids=["queue", "queue-equal", "queue-stale-worst", "running", "kv", "lora-tiers"],
)
def test_scorer_formulas(scorer, metrics, expected):
    assert scorer.score(req("a"), cands(metrics)) == pytest.approx(expected)


def test_inflight_load_counts_requests_and_tokens():
    c = cands([m()] * 3, inflight=[0, 2, 1], tokens=[0, 0, 4096])
    # loads 0, 2 and 1 + 4096/2048 = 3, each request 1/8 of the range
    assert InflightLoadScorer(tokens_per_request=2048, load_scale=8).score(req(), c) == pytest.approx(
        [1.0, 0.75, 0.625])
    assert InflightLoadScorer(load_scale=2).score(req(), c) == pytest.approx([1.0, 0.0, 0.0])


def test_affinity_guard_scales_down_hot_endpoints():
    # estimated queues: scraped waiting + requests sent since the scrape
    c = cands([m(waiting=0), m(waiting=3), m(waiting=2), m(waiting=0, kv=0.97)], unseen=[0, 2, 10, 0],
              prefix=[1.0, 1.0, 1.0, 1.0])
    guarded = GuardedAffinityScorer(PrefixCacheScorer(), max_extra_load=4)
    # queue 5 is 1 over the cap of 4 above the floor → 0.75; 12 is past twice the cap → 0; a full KV cache halves
    assert guarded.score(req(), c) == pytest.approx([1.0, 0.75, 0.0, 0.5])


def test_estimated_queue_adds_what_was_sent_since_the_scrape():
    c = cands([m(waiting=1), m(waiting=1), None], inflight=[3, 0, 6], unseen=[2, 0, 0])
    # queues 1 + 2 = 3, 1, and (no fresh metrics) everything in flight: 6
    assert EstimatedQueueScorer(queue_scale=4).score(req(), c) == pytest.approx([0.5, 1.0, 0.0])


def test_block_hashes_chain_and_depend_on_model():
    text = "a" * 64 * 3 + "tail"
    h = block_hashes(text, "m")
    assert len(h) == 3  # the partial tail block is not hashed
    assert block_hashes("a" * 64 * 2, "m") == h[:2]  # a hash names the whole prefix
    assert block_hashes(text, "other") != h
    assert block_hashes("b" + text[1:], "m")[2] != h[2]
    assert block_hashes("short", "m") == []


def test_prefix_index_matches_leading_blocks_and_evicts():
    idx = PrefixIndex()
    a, b = EPS[0].address, EPS[1].address
    h = block_hashes("x" * 64 * 4, "m")
    idx.record(a, h)
    idx.record(b, h[:2])
    assert idx.match(h, [a, b, EPS[2].address]) == [1.0, 0.5, 0.0]
    other = block_hashes("y" * 64 * 4, "m")
    idx.record(a, other, capacity=4)  # a's LRU holds 4 blocks: the first prompt's blocks go
    assert idx.match(h, [a, b]) == [0.0, 0.5]
    idx.forget({a})
    assert idx.match(h, [a, b]) == [0.0, 0.0] and idx.match(other, [a]) == [1.0]


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


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("plugins: [{type: no-such-scorer}]", "unknown plugin type 'no-such-scorer'"),
        ("plugins: [{type: queue-scorer}, {type: queue-scorer}]", "duplicate plugin name 'queue-scorer'"),
        ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer, "
         "weight: -1}]}]", "weight"),
        ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer, "
         "weight: heavy}]}]", "weight"),
        ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: d, plugins: [{pluginRef: nope}]}]",
         "unknown plugin 'nope'"),
        ("plugins: [{type: random-picker}, {type: max-score-picker}]", "2 pickers"),
        ("plugins: [{type: max-score-picker}]\nschedulingProfiles: [{name: d, plugins: [{pluginRef: "
         "max-score-picker, weight: 2}]}]", "not a scorer"),
        ("plugins: [{type: queue-scorer, colour: red}]", "colour"),
        ("plugins: [{type: prefix-cache-scorer, parameters: {affinityMaxExtraLoad: lots}}]", "affinityMaxExtraLoad"),
        ("plugins: [{type: queue-scorer}]\nsaturationDetector: {pluginRef: queue-scorer}", "saturationDetector"),
    ],
    ids=["unknown-type", "duplicate", "negative-weight", "string-weight", "unknown-ref", "two-pickers",
         "weight-on-picker", "unknown-field", "bad-parameter", "bad-detector"],
)
def test_profile_config_errors_are_clear(text, match):
    with pytest.raises(ConfigError, match=match):
        build_profile(parse_config(text, "cfg.yaml"), random.Random())


def test_full_config_builds_the_described_profile():
    profile = build_profile(parse_config("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {name: q, type: queue-scorer}
- {type: prefix-cache-scorer, parameters: {blockSizeTokens: 32, affinityMaxExtraLoad: 2}}
- {type: utilization-detector, parameters: {queueDepthThreshold: 10}}
- {type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: utilization-detector}
  - {pluginRef: q, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: max-score-picker}
saturationDetector: {pluginRef: utilization-detector}
"""), random.Random())
    assert [(s.name, w) for s, w in profile.scorers] == [("q", 2.0), ("prefix-cache-scorer", 3.0)]
    assert isinstance(profile.scorers[1][0], GuardedAffinityScorer)
    assert profile.prefix is not None and profile.prefix.block_tokens == 32
    assert profile.max_endpoints == 2 and profile.detector.queue_threshold == 10
    assert len(profile.filters) == 1


def test_utilization_detector():
    d = UtilizationDetector()
    assert d.saturation([m(waiting=5), m(kv=0.8)]) == pytest.approx(1.0)
    assert d.saturation([m(waiting=1), None]) == pytest.approx(0.6)  # stale counts as saturated
    assert d.filter(req(), cands([m(waiting=1), m(waiting=9), None])) == [0]
    assert d.filter(req(), cands([m(waiting=9), None])) == [0, 1]  # never filters everything


def store_with(metrics, models=None) -> Datastore:
    s = datastore(EPS[: len(metrics)], models=models, objectives={"batch": -1, "chat": 5}, clock=lambda: NOW)
    for e, mm in zip(EPS, metrics, strict=False):
        if mm is not None:
            s.set_metrics(e.address, mm)
    return s


@pytest.mark.parametrize(
    ("crit", "metrics", "shed"),
    [
        (Criticality.SHEDDABLE, [m(waiting=9), m(kv=0.95)], True),
        (Criticality.SHEDDABLE, [m(waiting=9), None], True),  # stale metrics count as saturated
        (Criticality.SHEDDABLE, [m(waiting=1), m(kv=0.3)], False),
        (Criticality.STANDARD, [m(waiting=9), m(kv=0.95)], False),
        (Criticality.CRITICAL, [m(waiting=9), m(kv=0.95)], False),
    ],
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


@pytest.mark.parametrize(("objective", "shed"), [("batch", True), ("chat", False), ("unknown", False), (None, False)])
def test_shedding_by_objective_priority(objective, shed):
    store = store_with([m(waiting=9), m(waiting=9)])
    router = Router(store, build_scheduler("epp-default", store))
    headers = {"x-gateway-inference-objective": objective} if objective else {}
    r = req(headers=headers)
    if shed:
        with pytest.raises(Shed):
            router.route(r, {"model": "base"})
    else:
        assert router.route(r, {"model": "base"}).primary in EPS


def test_model_criticality_from_policy_sheds():
    store = store_with([m(waiting=9)], models={"base": ModelPolicy("base", Criticality.SHEDDABLE)})
    router = Router(store, build_scheduler("epp-default", store))
    with pytest.raises(Shed):
        router.route(req(), {"model": "base"})


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
    seen = []
    store = store_with([m(), m()])
    sched = build_scheduler("epp-default", store, observe=lambda *a: seen.append(a[:3]))
    sched.schedule(req(prompt="z" * 200), EPS[:2])
    assert ("Scorer", "prefix-cache-scorer", "prefix-cache-scorer") in seen
    assert ("Picker", "max-score-picker", "max-score-picker") in seen


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
