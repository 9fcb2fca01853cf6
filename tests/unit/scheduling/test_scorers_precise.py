"""The precise prefix scorer (``precise-prefix-cache-scorer`` in ``epp/scheduling/scorers.py``):
KV-event matches, the approximate fallback, the load guard, and the ``epp-precise`` profile."""

from __future__ import annotations

import random

import pytest

from epp.datalayer.kvevents import KVEventIndex
from epp.errors import ConfigError
from epp.scheduling import build_scheduler, builtin_config, parse_config
from epp.scheduling.blockkeys import BlockKeys
from epp.scheduling.profile import build_profile
from epp.scheduling.scorers import GuardedAffinityScorer, PrecisePrefixCacheScorer

from support.kvevents import PROMPT, publish
from support.scheduling import EPS, cands, m, req, store_with


def test_score_is_the_reported_leading_run_over_the_prompt_blocks() -> None:
    idx = KVEventIndex(BlockKeys())
    publish(idx, EPS[0].address, 8)
    publish(idx, EPS[1].address, 2)
    publish(idx, EPS[2].address, 8, model="other-model")
    scorer = PrecisePrefixCacheScorer(index=idx)
    c = cands([m()] * 4, prefix=[0.0, 0.0, 0.0, 0.75])
    # pod 3 publishes nothing: the approximate index's 0.75 stands
    assert scorer.score(req("base", PROMPT), c) == [1.0, 0.25, 0.0, 0.75]


def test_without_an_index_or_prompt_it_is_the_approximate_score() -> None:
    c = cands([m()] * 2, prefix=[0.5, 0.0])
    assert PrecisePrefixCacheScorer().score(req("base", PROMPT), c) == [0.5, 0.0]
    idx = KVEventIndex(BlockKeys())
    publish(idx, EPS[0].address, 8)
    assert PrecisePrefixCacheScorer(index=idx).score(req("base", ""), c) == [0.5, 0.0]


def test_the_guard_cuts_affinity_on_a_hot_pod() -> None:
    idx = KVEventIndex(BlockKeys())
    publish(idx, EPS[0].address, 8)
    publish(idx, EPS[1].address, 8)
    guarded = GuardedAffinityScorer(PrecisePrefixCacheScorer(index=idx), max_extra_load=4)
    c = cands([m(waiting=12), m(waiting=0)])
    assert guarded.score(req("base", PROMPT), c) == [0.0, 1.0]  # 12 queued over the shortest: affinity gone


def test_build_scheduler_binds_the_index_and_the_profile_keeps_the_fallback() -> None:
    idx = KVEventIndex(BlockKeys())
    publish(idx, EPS[1].address, 8)
    store = store_with([m(), m(), m()])
    s = build_scheduler("epp-precise", store, rng=random.Random(1), kv_index=idx)
    assert s.prefix_index is not None  # the approximate index still learns, for pods without events
    (precise,) = [sc for sc, _ in s.profile.scorers if sc.type == "precise-prefix-cache-scorer"]
    assert isinstance(precise, GuardedAffinityScorer) and isinstance(precise.inner, PrecisePrefixCacheScorer)
    assert precise.inner.index is idx
    picks = {s.schedule(req("base", PROMPT), EPS[:3])[0].address for _ in range(5)}
    assert picks == {EPS[1].address}  # the pod that reports the prefix, every time


def test_epp_precise_is_epp_default_with_the_precise_scorer() -> None:
    precise = builtin_config("epp-precise").model_dump()
    default = builtin_config("epp-default").model_dump()
    swap = {"prefix-cache-scorer": "precise-prefix-cache-scorer"}
    assert [swap.get(p["type"], p["type"]) for p in default["plugins"]] == [p["type"] for p in precise["plugins"]]


@pytest.mark.parametrize(
    "params, error",
    [("{tokenizer: tiktoken}", "tokenizer must be one of llmd-sim, utf8-quad"),
     ("{maxPrefixBlocksToMatch: 0}", "maxPrefixBlocksToMatch must be a number >= 1"),
     ("{speculativeTTL: -1}", "speculativeTTL must be a number >= 0"),
     ("{speculativeTTL: .nan}", "speculativeTTL must be at most 60 seconds"),
     ("{speculativeTTL: .inf}", "speculativeTTL must be at most 60 seconds"),
     ("{speculativeTTL: 61}", "speculativeTTL must be at most 60 seconds"),
     ("{loraGate: maybe}", "loraGate must be true or false")],
    ids=["tokenizer", "max-blocks", "ttl-negative", "ttl-nan", "ttl-inf", "ttl-too-long", "lora-gate"],
)  # fmt: skip
def test_bad_parameters_are_config_errors(params, error) -> None:
    config = parse_config(f"plugins:\n- {{type: precise-prefix-cache-scorer, parameters: {params}}}\n")
    with pytest.raises(ConfigError, match=error):
        build_profile(config, random.Random())


def test_parameters_reach_the_key_scheme() -> None:
    config = parse_config(
        "plugins:\n- {type: precise-prefix-cache-scorer, parameters: {maxPrefixBlocksToMatch: 3, blockSizeTokens: 8}}\n"
    )
    profile = build_profile(config, random.Random())
    ((scorer, _),) = profile.scorers
    assert isinstance(scorer, PrecisePrefixCacheScorer) and scorer.keys.max_blocks == 3
    assert profile.prefix is not None and profile.prefix.block_tokens == 8  # the approximate fallback's settings


def test_an_adapters_blocks_count_only_as_much_as_the_adapter_can_run_there() -> None:
    """Blocks another router left on a pod are worth little for an adapter that is gone from it:
    the match is scaled by the pod's LoRA state (running 1, free slot 0.8, waiting 0.6, none
    0.25) once some candidate reports the adapter; the base model is not scaled."""
    idx = KVEventIndex(BlockKeys())
    for e in EPS[:4]:
        publish(idx, e.address, 8, model="sql-lora")
    scorer = PrecisePrefixCacheScorer(index=idx)
    full = ("a", "b", "c", "d")
    c = cands([m(active=("sql-lora",)), m(active=("a",)), m(pending=("sql-lora",), active=full[:3]), m(active=full)])
    assert scorer.score(req("sql-lora", PROMPT), c) == [1.0, 0.8, 0.6, 0.25]
    assert PrecisePrefixCacheScorer(index=idx, lora_gate=False).score(req("sql-lora", PROMPT), c) == [1.0] * 4
    cold = cands([m(active=full)] * 4)  # no candidate has the adapter: nothing to weigh it by
    assert scorer.score(req("sql-lora", PROMPT), cold) == [1.0] * 4
