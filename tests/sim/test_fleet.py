"""Unit tests of the virtual-time fleet: routing callbacks, scraped staleness, determinism."""

from __future__ import annotations

from collections.abc import Sequence

from epp_sim.domain import EngineConfig
from epp_sim.fleet import PodSnapshot, RequestResult, TraceRequest, VirtualFleet, least_queue, round_robin
from epp_sim.profiles import FAST

CFG = EngineConfig(profile=FAST, num_gpu_blocks=4096, max_num_seqs=4)


def trace(n: int, gap: float, tokens: int = 200, max_tokens: int = 8) -> list[TraceRequest]:
    return [TraceRequest(i * gap, f"request {i:04d} " + "x" * (tokens * 4 - 13), max_tokens) for i in range(n)]


def test_round_robin_spreads_and_results_are_complete() -> None:
    fleet = VirtualFleet([CFG] * 3, round_robin())
    results = fleet.run(trace(9, 0.001))
    assert sorted(r.request_id for r in results) == [str(i) for i in range(9)]
    assert [sum(r.pod == p for r in results) for p in range(3)] == [3, 3, 3]
    for r in results:
        assert r.output_tokens == 8 and r.ttft > 0 and r.e2e > r.ttft and r.itl > 0


def test_runs_are_deterministic() -> None:
    def run() -> list[RequestResult]:
        return VirtualFleet([CFG] * 2, least_queue).run(trace(40, 0.0005))

    assert run() == run()


def test_stale_scrapes_herd_arrivals() -> None:
    seen: list[tuple[int, int]] = []

    def spy(req: TraceRequest, pods: Sequence[PodSnapshot], now: float) -> int:
        pick = least_queue(req, pods, now)
        seen.append((pick, pods[pick].running))
        return pick

    # Live view: consecutive arrivals see each other and spread out.
    VirtualFleet([CFG] * 4, spy).run(trace(4, 0.0001))
    assert sorted(p for p, _ in seen) == [0, 1, 2, 3]
    # A 50 ms scrape interval hides them: after pod 0's first scrape, the other arrivals all
    # land on the one pod that still looks idle.
    seen.clear()
    VirtualFleet([CFG] * 4, spy, scrape_interval=0.05).run(trace(4, 0.0001, max_tokens=400))
    assert len({p for p, _ in seen[1:]}) == 1


def test_least_queue_beats_round_robin_on_skewed_load() -> None:
    # Every third request is huge; round robin keeps sending work to the pod stuck with them.
    reqs = [
        TraceRequest(i * 0.002, f"r{i:03d} " + "y" * (16000 if i % 3 == 0 else 400), 64 if i % 3 == 0 else 4)
        for i in range(60)
    ]
    rr = VirtualFleet([CFG] * 3, round_robin()).run(reqs)
    lq = VirtualFleet([CFG] * 3, least_queue).run(reqs)

    def mean_ttft(results: list[RequestResult]) -> float:
        return sum(r.ttft for r in results) / len(results)

    assert mean_ttft(lq) < mean_ttft(rr)


def test_on_finish_and_prefix_affinity() -> None:
    done: list[RequestResult] = []
    shared = "system prompt " * 200
    reqs = [TraceRequest(i * 0.05, shared + f"question {i}", 4) for i in range(6)]
    results = VirtualFleet([CFG] * 2, lambda _r, _p, _n: 0, on_finish=done.append).run(reqs)
    assert done == results and len(results) == 6
    assert results[0].cached_tokens == 0
    assert all(r.cached_tokens >= 640 for r in results[1:])
