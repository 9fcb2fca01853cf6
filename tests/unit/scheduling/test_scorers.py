"""Scorers (``epp/scheduling/scorers.py``): one score per candidate, by formula."""

from __future__ import annotations

import random

import pytest
import yaml

from epp.datalayer import Datastore
from epp.datalayer.kvevents import KVEventIndex
from epp.scheduling import EndpointPickerConfig, Scheduler, build_scheduler, builtin_config, parse_config
from epp.scheduling.blockkeys import BlockKeys
from epp.scheduling.scorers import (
    EstimatedQueueScorer,
    GuardedAffinityScorer,
    InflightLoadScorer,
    KvCacheScorer,
    LoraAffinityScorer,
    PrecisePrefixCacheScorer,
    PrefixCacheScorer,
    QueueScorer,
    RunningRequestsScorer,
)
from epp_sim.kvevents import BlockStored, encode_batch, frames

from support.scheduling import EPS, cands, m, req, store_with


@pytest.mark.parametrize(
    ("scorer", "metrics", "expected"),
    [
        (QueueScorer(), [m(waiting=0), m(waiting=5), m(waiting=10)], [1.0, 0.5, 0.0]),
        (QueueScorer(), [m(waiting=3), m(waiting=3)], [1.0, 1.0]),
        (QueueScorer(), [m(waiting=3), None], [1.0, 0.0]),
        (RunningRequestsScorer(), [m(running=2), m(running=6)], [1.0, 0.0]),
        (KvCacheScorer(), [m(kv=0.25), m(kv=1.0), None], [0.75, 0.0, 0.0]),
        # adapter active 1.0 > free slot 0.8 > adapter waiting 0.6 > slots full 0; stale: 0
        (LoraAffinityScorer(), [m(active=["a"]), m(active=["b"]), m(active=["b", "c", "d", "e"], pending=["a"]),
                                m(active=["b", "c", "d", "e"]), None], [1.0, 0.8, 0.6, 0.0, 0.0]),
    ],
    ids=["queue", "queue-equal", "queue-stale-worst", "running", "kv", "lora-tiers-and-stale"],
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


# ---- the precise prefix scorer's speculative entries (pre_request after each pick) ---------------

BURST = "".join(f"[burst {i}: a system prompt no pod has reported yet]".ljust(64, "~") for i in range(4))  # 4 blocks


class Clock:
    """The KV-event index's clock for speculative entries, advanced by hand."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def reported_index(clock: Clock) -> KVEventIndex:
    """Every pod of ``EPS`` has published one block of an unrelated prompt (block size 16 known),
    none of ``BURST``."""
    idx = KVEventIndex(BlockKeys(), now=clock)
    stored = BlockStored((1,), None, tuple(range(16)), 16)
    for e in EPS:
        idx.apply(e.address, frames(f"kv@{e.address}@base".encode(), 0, encode_batch(0.0, [stored])))
    return idx


def precise_config(**params: object) -> EndpointPickerConfig:
    """``epp-precise`` with parameters added to its precise scorer, through the YAML config path."""
    doc = builtin_config("epp-precise").model_dump(by_alias=True, exclude_none=True)
    (plugin,) = [p for p in doc["plugins"] if p["type"] == "precise-prefix-cache-scorer"]
    plugin["parameters"].update(params)
    return parse_config(yaml.safe_dump(doc))


BARE_PRECISE = parse_config("plugins:\n- {type: precise-prefix-cache-scorer}\n- {type: max-score-picker}\n")


def burst(s: Scheduler, store: Datastore, n: int) -> list[str]:
    """``n`` requests sharing BURST, each sent (its ticket held) before the next is scheduled."""
    picks = []
    for _ in range(n):
        (e,) = s.schedule(req("base", BURST), EPS)
        store.load.acquire(e)
        picks.append(e.address)
    return picks


@pytest.mark.parametrize(
    ("config", "wrapped"),
    [("epp-precise", True), (BARE_PRECISE, False)],
    ids=["epp-precise-guarded", "bare-scorer"],
)
def test_a_burst_sharing_a_new_prefix_goes_to_one_pod(config, wrapped) -> None:
    clock = Clock()
    idx = reported_index(clock)
    store = store_with([m()] * len(EPS))
    s = build_scheduler(config, store, kv_index=idx, rng=random.Random(0))
    (scorer,) = [sc for sc, _ in s.profile.scorers if sc.type == "precise-prefix-cache-scorer"]
    assert isinstance(scorer, GuardedAffinityScorer) is wrapped  # pre_request reaches the scorer either way
    picks = burst(s, store, 5)
    assert len(set(picks)) == 1
    assert idx.stats.speculated == 5  # one entry per pick
    keys = BlockKeys().prompt_keys(BURST, "base", 16)
    assert len(keys) == 4 and idx.leading_run(picks[0], keys) == 4
    assert all(idx.leading_run(e.address, keys) == 0 for e in EPS if e.address != picks[0])


def test_without_speculation_the_burst_spreads() -> None:
    config = precise_config(speculativeTTL=0)
    idx = reported_index(Clock())
    store = store_with([m()] * len(EPS))
    s = build_scheduler(config, store, kv_index=idx, rng=random.Random(0))
    (scorer,) = [sc for sc, _ in s.profile.scorers if sc.type == "precise-prefix-cache-scorer"]
    assert isinstance(scorer, GuardedAffinityScorer) and isinstance(scorer.inner, PrecisePrefixCacheScorer)
    assert scorer.inner.speculative_ttl == 0
    picks = burst(s, store, len(EPS))
    assert sorted(picks) == sorted(e.address for e in EPS)  # no pod looks like a holder: least loaded wins
    assert idx.stats.speculated == 0


def test_speculative_entries_stop_counting_after_their_ttl() -> None:
    clock = Clock()
    idx = reported_index(clock)
    store = store_with([m()] * len(EPS))
    s = build_scheduler("epp-precise", store, kv_index=idx, rng=random.Random(0))
    picks = burst(s, store, 4)
    (holder,) = set(picks)
    keys = BlockKeys().prompt_keys(BURST, "base", 16)
    clock.t += 1.9  # the default speculativeTTL is 2 s
    assert idx.leading_run(holder, keys) == 4
    clock.t += 0.2
    assert idx.leading_run(holder, keys) == 0
    # no pod is believed to hold the prefix any more: the next request avoids the loaded holder
    (e,) = s.schedule(req("base", BURST), EPS)
    assert e.address != holder
