"""epp against a vLLM simulator we did not write: llm-d-inference-sim (Go), behind real Envoy.

Two simulator processes with LoRA adapters and ``--enable-kvcache`` serve a pool; epp runs
in-process and scrapes them; Envoy routes streaming requests through epp's ext_proc.
The test shows epp reads their queue / running / KV / LoRA / cache-geometry metrics and
that requests reach both pods.

The simulator is built once with ``go install …@v0.10.2`` into ``~/.cache/epp/go-bin``
(see ``tests/support/llmd_sim.py``); the test is skipped only where no Go toolchain exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from epp.app import App
from epp.config import load_pool_file
from epp.domain import EndpointMetrics
from epp.envoy.config import render_bootstrap
from epp.envoy.process import EnvoyProcess

from support import llmd_sim, settings

BASE_MODEL = "/model/llama2"
ADAPTERS = ("sql-lora", "tweet-summary")
MAX_LORAS = 2
MAX_NUM_SEQS = 2  # small, so a handful of concurrent requests also builds a waiting queue
KV_CACHE_BLOCKS = 128
BLOCK_SIZE = 16

SIM_ARGS = [
    "--model", BASE_MODEL,
    "--lora-modules", *(llmd_sim.lora_module(a, BASE_MODEL) for a in ADAPTERS),
    "--max-loras", str(MAX_LORAS),
    "--max-num-seqs", str(MAX_NUM_SEQS),
    "--enable-kvcache",
    "--kv-cache-size", str(KV_CACHE_BLOCKS),
    "--block-size", str(BLOCK_SIZE),
    # No KV-event publishing: by default the simulator dials tcp://127.0.0.1:5557 forever.
    "--zmq-endpoint=",
    # Otherwise it asks https://huggingface.co/api/models/<model> at startup to pick a tokenizer.
    "--force-dummy-tokenizer",
    # Latency, so requests overlap: ~0.1 s + 24 x 30 ms ≈ 0.8 s per request.
    "--time-to-first-token", "100ms",
    "--inter-token-latency", "30ms",
    "--seed", "7",
]
MAX_TOKENS = 24


@pytest.fixture(scope="session")
def sim_binary() -> Path:
    return llmd_sim.binary_or_skip()


@dataclass
class Fleet:
    sims: list[llmd_sim.LlmdSim]
    app: App
    envoy: EnvoyProcess
    url: str
    http: aiohttp.ClientSession
    seen: dict[str, Seen] = field(default_factory=dict)
    news: asyncio.Condition = field(default_factory=asyncio.Condition)  # notified when `seen` changes


@dataclass
class Seen:
    """Everything epp's datastore showed for one pod while the test watched."""

    max_running: int = 0
    max_waiting: int = 0
    max_kv: float = 0.0
    adapters: set[str] = field(default_factory=set)
    waiting_adapters: set[str] = field(default_factory=set)
    scrapes: int = 0
    last: EndpointMetrics | None = None

    def add(self, m: EndpointMetrics) -> bool:
        if m is self.last:
            return False
        self.last = m
        self.scrapes += 1
        self.max_running = max(self.max_running, m.running)
        self.max_waiting = max(self.max_waiting, m.waiting)
        self.max_kv = max(self.max_kv, m.kv_usage)
        self.adapters |= m.active_adapters
        self.waiting_adapters |= m.waiting_adapters
        return True


@pytest.fixture
async def fleet(sim_binary: Path, tmp_path: Path, write_pool) -> AsyncIterator[Fleet]:
    http = aiohttp.ClientSession()
    sims: list[llmd_sim.LlmdSim] = []
    app: App | None = None
    envoy: EnvoyProcess | None = None
    try:
        for i in range(2):
            sim = llmd_sim.LlmdSim(sim_binary, SIM_ARGS, name=f"sim-{i}", log_dir=tmp_path)
            sims.append(sim)
            await sim.start(http)
        # No `models:` section: epp passes model names (base model and adapters) through.
        pool = write_pool([s.address for s in sims])
        app = App(settings(pool), registry=CollectorRegistry(), rng=random.Random(3))
        await app.start()
        envoy = EnvoyProcess(render_bootstrap(load_pool_file(pool), listen_port=0,
                                              epp_address=f"127.0.0.1:{app.grpc_port}"))
        await envoy.start()
        yield Fleet(sims, app, envoy, "http://" + await envoy.listener_address(), http)
    finally:
        if envoy is not None:
            await envoy.aclose()
        if app is not None:
            await app.aclose()
        for sim in sims:
            await sim.stop()
        await http.close()


async def watch(fleet: Fleet, stop: asyncio.Event) -> None:
    """Record what epp's datastore holds for each pod until ``stop``.

    The values come from another process (scraped every 50 ms), so there is nothing to
    await but time: sample every 10 ms, always bounded by the caller's deadline.
    """
    while not stop.is_set():
        changed = False
        for s in fleet.sims:
            if (m := fleet.app.datastore.metrics(s.address)) is not None:
                changed |= fleet.seen.setdefault(s.address, Seen()).add(m)
        if changed:
            async with fleet.news:
                fleet.news.notify_all()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.01)


async def until(fleet: Fleet, condition, timeout: float, what: str) -> None:
    """Wait (bounded) until ``condition(seen_per_address)`` holds, re-checked on every new scrape."""
    try:
        async with asyncio.timeout(timeout), fleet.news:
            await fleet.news.wait_for(lambda: condition(fleet.seen))
    except TimeoutError:
        raise AssertionError(f"epp never saw {what} within {timeout}s; saw {fleet.seen}") from None


PROMPT_WORDS = (
    "select", "the", "rows", "where", "total", "of", "orders", "placed", "by", "each", "customer", "in",
    "last", "quarter", "is", "above", "average", "and", "summarise", "them", "one", "short", "tweet",
)


def prompt(i: int) -> str:
    """~60 dummy-tokenizer tokens (3 full KV blocks of 16), distinct per request."""
    rng = random.Random(i)
    return f"request {i}: " + " ".join(rng.choice(PROMPT_WORDS) for _ in range(56))


@dataclass
class Result:
    status: int
    pod: str
    model: str
    usage: dict


async def stream_completion(fleet: Fleet, i: int, model: str) -> Result:
    doc = {"model": model, "prompt": prompt(i), "max_tokens": MAX_TOKENS, "ignore_eos": True,
           "stream": True, "stream_options": {"include_usage": True}}
    async with fleet.http.post(fleet.url + "/v1/completions", data=orjson.dumps(doc),
                               headers={"content-type": "application/json"}) as r:
        body = await r.read()
        pod = r.headers.get("x-inference-pod", "")
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert r.status != 200 or events[-1] == b"data: [DONE]", body[-300:]
    chunks = [orjson.loads(e[6:]) for e in events[:-1]] if r.status == 200 else []
    usage = next((c["usage"] for c in reversed(chunks) if c.get("usage")), {})
    return Result(r.status, pod, chunks[0]["model"] if chunks else "", usage)


def sim_counter(text: str, name: str) -> float:
    """Sum of a counter over all its series in a simulator's own /metrics page."""
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def sim_counter_reaches(fleet: Fleet, sim: llmd_sim.LlmdSim, name: str, expected: float) -> None:
    """The simulator updates its counters from a goroutine after the response is sent, so a
    read right after the last response may be a moment early: re-read (bounded) until equal."""
    value = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            while True:
                async with fleet.http.get(sim.url + "/metrics") as r:
                    value = sim_counter(await r.text(), name)
                if value == expected:
                    return
                await asyncio.sleep(0.02)
    raise AssertionError(f"{sim.name}: {name} = {value}, expected {expected}")


# The first run builds the simulator with Go (about 5 minutes on 2 cores; later runs reuse the
# cached binary): the per-test timeout must cover the session fixture's install.
@pytest.mark.timeout(1800)
async def test_epp_reads_llmd_sim_metrics_and_routes_through_envoy_to_both(fleet: Fleet):
    addresses = {s.address for s in fleet.sims}
    stop_watch = asyncio.Event()
    watcher = asyncio.create_task(watch(fleet, stop_watch))
    try:
        # 1. Idle pods, as scraped: geometry from cache_config_info, max_lora from lora_requests_info.
        await until(fleet, lambda seen: set(seen) == addresses, 10, "a first scrape of both pods")
        for s in fleet.sims:
            m = fleet.app.datastore.metrics(s.address)
            assert m is not None
            assert (m.running, m.waiting, m.kv_usage) == (0, 0, 0.0), m
            assert (m.max_lora, m.block_size, m.num_blocks) == (MAX_LORAS, BLOCK_SIZE, KV_CACHE_BLOCKS), m
            assert m.active_adapters == frozenset() and m.waiting_adapters == frozenset(), m

        # 2. Load through Envoy: 6 streaming requests in flight at all times (3 per pod when
        # balanced, over 2 slots each, so requests also queue), alternating the adapters,
        # until epp has seen every pod running, queueing, holding KV blocks and using adapters.
        # The load is continuous because the simulator stamps lora_requests_info with whole
        # seconds: a state change in the same second as the previous one ties with it.
        results: list[Result] = []
        stop_load = asyncio.Event()
        counter = itertools.count()

        async def client() -> None:
            while not stop_load.is_set():
                i = next(counter)
                results.append(await stream_completion(fleet, i, ADAPTERS[i % len(ADAPTERS)]))

        clients = [asyncio.create_task(client()) for _ in range(6)]

        def busy_everywhere(seen: dict[str, Seen]) -> bool:
            return all(
                p.max_running >= 1 and p.max_kv > 0 and p.adapters for a, p in seen.items() if a in addresses
            ) and any(p.max_waiting >= 1 for p in seen.values()) and set().union(
                *(p.adapters for p in seen.values())) == set(ADAPTERS)

        try:
            await until(fleet, busy_everywhere, 20, "running, waiting, KV use and both adapters on both pods")
        finally:
            stop_load.set()
            await asyncio.gather(*clients)

        # 3. Every request went through Envoy to a simulator, and both pods served.
        assert results and all(r.status == 200 for r in results), [r for r in results if r.status != 200][:3]
        assert all(r.model in ADAPTERS and r.usage.get("completion_tokens") == MAX_TOKENS for r in results)
        served = {r.pod for r in results}
        assert served == {s.name for s in fleet.sims}, served
        # 4. What epp saw, pod by pod: queue, running, KV and LoRA state from the simulator.
        for s in fleet.sims:
            p = fleet.seen[s.address]
            print(f"{s.name}: served {sum(r.pod == s.name for r in results)}/{len(results)};"
                  f" epp saw running<={p.max_running} waiting<={p.max_waiting} kv<={p.max_kv:.4f}"
                  f" adapters={sorted(p.adapters)}"
                  f" waiting_adapters={sorted(p.waiting_adapters)} in {p.scrapes} distinct scrapes")
            assert 1 <= p.max_running <= MAX_NUM_SEQS, p
            assert 0 < p.max_kv <= 1, p
            assert p.adapters <= set(ADAPTERS) and p.waiting_adapters <= set(ADAPTERS), p
            assert p.last is not None and p.last.max_lora == MAX_LORAS

        # 5. Drained: the gauges epp reads go back to zero.
        await until(fleet, lambda seen: all(
            seen[a].last.running == 0 and seen[a].last.waiting == 0 and seen[a].last.kv_usage == 0
            for a in addresses), 10, "the pods idle again")
        assert fleet.app.datastore.load.total_inflight() == 0
        # ... and each pod's own request counter agrees with the x-inference-pod headers.
        for s in fleet.sims:
            await sim_counter_reaches(fleet, s, "vllm:request_success_total", sum(r.pod == s.name for r in results))
    finally:
        stop_watch.set()
        await watcher

    # 6. The simulators shut down cleanly on SIGTERM.
    for s in fleet.sims:
        assert await s.stop() == 0, s.log_tail()
