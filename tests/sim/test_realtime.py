"""Real time vs virtual time: the same trace over HTTP pods and over `VirtualFleet` must agree."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence

import aiohttp
import orjson
import pytest

from epp_sim.domain import EngineConfig, SimRequest
from epp_sim.fleet import TraceRequest, VirtualFleet, round_robin
from epp_sim.profiles import FAST
from epp_sim.server import PodConfig, SimFleet

ENGINE = EngineConfig(profile=FAST, num_gpu_blocks=2048, max_num_batched_tokens=1024, max_num_seqs=4)
SHARED = "You are a helpful SQL assistant. Answer briefly. " * 40  # ~500 tokens shared by half the requests


def make_trace() -> list[TraceRequest]:
    trace = []
    for i in range(16):
        body = f"question {i}: " + "select * from t where x = 1; " * (100 + 120 * (i % 4))  # 0.8k-3.5k tokens
        prompt = SHARED + body if i % 2 else body
        trace.append(TraceRequest(arrival=0.006 * i, prompt=prompt, max_tokens=8 + (i % 3) * 6, request_id=str(i)))
    return trace


async def replay(trace: Sequence[TraceRequest], urls: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Send each request at its arrival offset (round robin); client-side (ttft, e2e) per id."""
    out: dict[str, tuple[float, float]] = {}
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        for url in urls:  # open keep-alive connections first
            async with http.get(url + "/health") as resp:
                assert resp.status == 200
        t0 = loop.time() + 0.02

        async def one(k: int, tr: TraceRequest) -> None:
            await asyncio.sleep(t0 + tr.arrival - loop.time())  # trace replay, not synchronisation
            start = time.perf_counter()
            first = 0.0
            body = {"prompt": tr.prompt, "max_tokens": tr.max_tokens, "stream": True}
            headers = {"x-request-id": tr.request_id}
            async with http.post(urls[k % len(urls)] + "/v1/completions", json=body, headers=headers) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: {") and not first:
                        assert orjson.loads(line[6:])["choices"][0]["text"]
                        first = time.perf_counter() - start
            out[tr.request_id] = (first, time.perf_counter() - start)

        await asyncio.gather(*(one(k, tr) for k, tr in enumerate(trace)))
    return out


def mean(xs: Iterable[float]) -> float:
    values = list(xs)
    return sum(values) / len(values)


async def test_real_time_matches_virtual_time() -> None:
    trace = make_trace()
    by_id = {tr.request_id: tr for tr in trace}
    async with SimFleet(PodConfig(engine=ENGINE), 2) as fleet:
        client = await replay(trace, [p.url for p in fleet.pods])
        served: dict[str, tuple[int, SimRequest]] = {}
        for i, pod in enumerate(fleet.pods):
            await pod.idle()
            served.update({r.request_id.removesuffix("-0"): (i, r) for r in pod.completed})
    assert set(served) == set(by_id)

    # 1. Engine level. Replaying, in virtual time, the arrivals the HTTP pods actually saw
    # reproduces their schedules: same batches, same step boundaries, same token times.
    base = min(r.arrival for _, r in served.values())
    seen = [
        TraceRequest(r.arrival - base, by_id[rid].prompt, by_id[rid].max_tokens, request_id=rid)
        for rid, (_, r) in served.items()
    ]
    virtual = {
        r.request_id: r for r in VirtualFleet([ENGINE] * 2, lambda tr, _p, _n: served[tr.request_id][0]).run(seen)
    }
    for rid, (index, req) in served.items():
        v = virtual[rid]
        assert v.pod == index and v.cached_tokens == req.cached_tokens
        assert req.first_token_time is not None and req.finish_time is not None
        assert req.first_token_time - req.arrival == pytest.approx(v.ttft, abs=1e-6), rid
        assert req.finish_time - req.arrival == pytest.approx(v.e2e, abs=1e-6), rid

    # 2. Client level. Against the nominal trace, what clients measured (send jitter, HTTP,
    # timer wake-ups included) agrees on average.
    nominal = VirtualFleet([ENGINE] * 2, round_robin()).run(trace)
    assert max(r.ttft for r in nominal) > 0.1  # queueing matters in this trace...
    assert sum(r.cached_tokens > 0 for r in nominal) >= 4  # ...and so do prefix hits
    assert mean(c[0] for c in client.values()) == pytest.approx(mean(r.ttft for r in nominal), rel=0.2, abs=0.005)
    assert mean(c[1] for c in client.values()) == pytest.approx(mean(r.e2e for r in nominal), rel=0.2, abs=0.005)
