"""The simulator's engine (``epp_sim/engine.py``), in virtual time: timing, prefix hits,
chunked prefill, batching limits, preemption, LoRA, aborts and invariants under random load."""

from __future__ import annotations

import dataclasses
import random

import pytest

from epp_sim.domain import EngineConfig, RequestTooLarge, SimRequest, Status
from epp_sim.engine import Engine, StepOutput
from epp_sim.profiles import FAST, H100_8B
from epp_sim.tokenizer import tokenize

from support.sim import text_of

FAST_CFG = EngineConfig(profile=FAST, num_gpu_blocks=4096)


def make(
    engine: Engine, rid: str, text: str, max_tokens: int, arrival: float = 0.0, adapter: str | None = None
) -> SimRequest:
    prompt = tokenize(text, engine.config.block_size, adapter)
    req = SimRequest(rid, prompt, max_tokens, arrival, adapter)
    engine.add_request(req)
    return req


def drain(engine: Engine) -> list[StepOutput]:
    outs: list[StepOutput] = []
    t = engine.next_event_time()
    while t is not None:
        outs += engine.advance(t)
        t = engine.next_event_time()
    return outs


def test_single_request_timing() -> None:
    engine = Engine(FAST_CFG)
    req = make(engine, "a", text_of(1000), max_tokens=4, arrival=1.0)
    outs = drain(engine)
    assert len(outs) == 4 and req.finish_reason == "length" and req.num_output == 4
    prefill = FAST.step_time(1000, 1000, 1000 * 500)
    assert req.first_token_time == pytest.approx(1.0 + prefill)
    assert outs[1].end - outs[1].start == pytest.approx(FAST.step_time(1, 1001, 1000.5))
    assert engine.kv.used == 0 and engine.state().running == 0


def test_prefix_hit_cuts_ttft() -> None:
    engine = Engine(FAST_CFG)
    first = make(engine, "a", text_of(4000), max_tokens=2)
    drain(engine)
    second = make(engine, "b", text_of(4000), max_tokens=2, arrival=10.0)
    drain(engine)
    assert first.cached_tokens == 0
    assert second.cached_tokens == 3984  # 249 of 250 blocks: the last token is always recomputed
    assert second.first_token_time is not None and first.first_token_time is not None
    assert second.first_token_time - 10.0 < 0.2 * first.first_token_time
    assert engine.counters.prefix_hits == 3984 and engine.counters.prefix_queries == 8000


def test_chunked_prefill_respects_token_budget() -> None:
    engine = Engine(dataclasses.replace(FAST_CFG, max_num_batched_tokens=512))
    req = make(engine, "a", text_of(2000), max_tokens=1)
    outs = drain(engine)
    assert [o.num_tokens for o in outs] == [512, 512, 512, 464]
    assert req.num_output == 1


def test_max_num_seqs_queues_the_rest() -> None:
    engine = Engine(dataclasses.replace(FAST_CFG, max_num_seqs=2))
    reqs = [make(engine, str(i), text_of(100, str(i)), max_tokens=3) for i in range(3)]
    engine.advance(0.0)
    assert engine.state().running == 2 and engine.state().waiting == 1
    drain(engine)
    assert all(r.finished for r in reqs)
    assert reqs[2].first_scheduled is not None and reqs[2].first_scheduled > 0


def test_decode_step_grows_with_batch() -> None:
    def itl(batch: int) -> float:
        # A budget large enough to prefill everyone in one step, so that decode steps are pure.
        engine = Engine(EngineConfig(profile=H100_8B, max_num_batched_tokens=65536, max_model_len=65536))
        reqs = [make(engine, str(i), text_of(1000, f"{i}-"), max_tokens=8) for i in range(batch)]
        drain(engine)
        r = reqs[0]
        assert r.first_token_time is not None and r.finish_time is not None
        return (r.finish_time - r.first_token_time) / 7

    one, sixty_four = itl(1), itl(64)
    assert 0.0055 < one < 0.0065
    assert 0.009 < sixty_four < 0.012


def test_preemption_under_kv_pressure() -> None:
    engine = Engine(dataclasses.replace(FAST_CFG, num_gpu_blocks=41))  # 40 usable blocks = 640 tokens
    reqs = [make(engine, str(i), text_of(100, f"{i}-"), max_tokens=150) for i in range(4)]
    drain(engine)
    assert engine.counters.preemptions > 0
    assert sum(r.preemptions for r in reqs) == engine.counters.preemptions
    assert all(r.finished and r.num_output == 150 for r in reqs)
    assert engine.kv.used == 0


def test_lora_limit_defers_without_blocking() -> None:
    engine = Engine(dataclasses.replace(FAST_CFG, max_loras=1))
    a = make(engine, "a", text_of(50, "a"), max_tokens=20, adapter="sql-lora")
    b = make(engine, "b", text_of(50, "b"), max_tokens=5, adapter="tweet-summary")
    c = make(engine, "c", text_of(50, "c"), max_tokens=5)
    engine.advance(0.0)
    state = engine.state()
    assert a.status is Status.RUNNING and c.status is Status.RUNNING and b.status is Status.WAITING
    assert state.running_adapters == ("sql-lora",) and state.waiting_adapters == ("tweet-summary",)
    assert state.deferred == 1
    drain(engine)
    assert b.first_scheduled is not None and a.finish_time is not None
    assert b.first_scheduled >= a.finish_time
    assert engine.counters.lora_loads == 2


def test_lora_load_costs_time() -> None:
    base = Engine(FAST_CFG)
    lora = Engine(FAST_CFG)
    r1 = make(base, "a", text_of(100), max_tokens=1)
    r2 = make(lora, "a", text_of(100), max_tokens=1, adapter="sql-lora")
    drain(base)
    drain(lora)
    assert r1.first_token_time is not None and r2.first_token_time is not None
    extra = r2.first_token_time - r1.first_token_time
    assert extra == pytest.approx(FAST.lora_load_s + FAST.lora_step_s)


def test_abort_frees_blocks() -> None:
    engine = Engine(FAST_CFG)
    a = make(engine, "a", text_of(100, "a"), max_tokens=50)
    b = make(engine, "b", text_of(100, "b"), max_tokens=50)
    engine.advance(0.0)
    engine.abort(b, 0.0)
    assert b.finish_reason == "abort" and engine.state().running == 1
    drain(engine)
    assert a.num_output == 50 and b.num_output == 0 and engine.kv.used == 0


def test_arrivals_are_causal_and_idle_start_is_the_arrival() -> None:
    engine = Engine(FAST_CFG)
    late = make(engine, "late", text_of(10), max_tokens=1, arrival=5.0)
    assert engine.next_event_time() == 5.0
    assert engine.advance(4.0) == []
    drain(engine)
    assert late.first_scheduled == 5.0


@pytest.mark.parametrize(
    ("prompt_tokens", "max_tokens", "cfg"),
    [(8000, 500, FAST_CFG), (100, 100, dataclasses.replace(FAST_CFG, num_gpu_blocks=10))],
    ids=["context-length", "kv-capacity"],
)
def test_requests_that_never_fit_are_rejected(prompt_tokens: int, max_tokens: int, cfg: EngineConfig) -> None:
    engine = Engine(cfg)
    with pytest.raises(RequestTooLarge):
        make(engine, "x", text_of(prompt_tokens), max_tokens)
    assert engine.next_event_time() is None


def test_max_lag_reanchors() -> None:
    engine = Engine(FAST_CFG)
    req = make(engine, "a", text_of(10), max_tokens=3)
    engine.advance(0.0)
    engine.advance(10.0, max_lag=0.01)  # the loop stalled for 10 s: later steps start at 10 s
    drain(engine)
    assert req.finish_time is not None and req.finish_time > 10.0


def test_invariants_hold_under_random_load() -> None:
    rng = random.Random(3)
    engine = Engine(dataclasses.replace(FAST_CFG, num_gpu_blocks=120, max_loras=2, max_num_batched_tokens=256))
    prefixes = [text_of(64, f"p{k}") for k in range(3)]
    live: list[SimRequest] = []
    now = 0.0
    for i in range(300):
        now += rng.expovariate(2000.0)
        t = engine.next_event_time()
        while t is not None and t <= now:
            engine.advance(t)
            t = engine.next_event_time()
        if live and rng.random() < 0.05:
            engine.abort(live.pop(rng.randrange(len(live))), now)
        adapter = rng.choice([None, "a", "b", "c"])
        text = rng.choice(prefixes) + text_of(rng.randint(1, 200), f"{i}-")
        live.append(make(engine, str(i), text, rng.randint(1, 60), now, adapter))
        state = engine.state()
        assert set(state.running_adapters) == {r.adapter for r in engine.running if r.adapter}
        assert set(state.waiting_adapters) == {r.adapter for r in engine.waiting if r.adapter}
        shared = {h for r in engine.running for h in r.blocks.held}
        assert engine.kv.used == len(shared) + sum(r.blocks.private for r in engine.running) <= engine.kv.usable
    drain(engine)
    assert engine.counters.preemptions > 0 and engine.counters.lora_loads > 2
    assert engine.kv.used == 0 and engine.state() == engine.state().__class__(0, 0, 0, 0.0, (), ())
    assert all(r.finished and (r.finish_reason == "abort" or r.num_output == r.max_tokens) for r in live)
