"""Scorers (``epp/scheduling/scorers.py``): one score per candidate, by formula."""

from __future__ import annotations

import pytest

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

from support.scheduling import cands, m, req


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
