"""Cost of reading model-server metrics.

1. Parse cost of one 45 KB vLLM 0.33 /metrics page (median of many runs):
   epp's targeted parser (``parse_metrics``) vs prometheus_client's text parser
   extracting the same values.
2. Keeping N endpoints fresh at an interval: epp's real scrape loops (keep-alive HTTP/1.1,
   ``?name[]=`` filtering, parsing, datastore updates) against N metrics servers run
   in a separate process (``_metrics_servers.py``); reports the CPU share of one core used
   by the scraping process and the scrapes per second achieved vs the target.

One result row per run; its keys never depend on the arguments (the endpoint count and the
interval are the ``endpoints`` and ``interval_ms`` values). ``one_core_interval_ms`` is the
interval at which one core would keep ``endpoints`` endpoints fresh at the measured
end-to-end CPU cost per scrape.

    python benchmarks/scrape_bench.py [--endpoints 200] [--interval 50ms] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client.parser import text_string_to_metric_families

from _cli import ArgumentParser, Output, duration, positive_float, positive_int
from _stats import percentile
from epp.datalayer import Datastore
from epp.datalayer.engines import ENGINES
from epp.datalayer.exposition import parse_metrics
from epp.datalayer.scraper import ScrapeLoops
from epp.domain import Endpoint, Pool
from epp.supervisor import Supervisor
from epp_sim.vllm_page import vllm_exposition

VLLM = ENGINES["vllm"]
SERVERS = Path(__file__).resolve().with_name("_metrics_servers.py")


def prometheus_client_parse(text: str) -> tuple[float, float, float, str]:
    """The same extraction epp does, through prometheus_client's parser."""
    wanted = set(VLLM.families())
    running = waiting = kv = None
    lora: list[tuple[float, str]] = []
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for s in family.samples:
            if s.name == "vllm:num_requests_running" and running is None:
                running = s.value
            elif s.name == "vllm:num_requests_waiting" and waiting is None:
                waiting = s.value
            elif s.name == "vllm:kv_cache_usage_perc" and kv is None:
                kv = s.value
            elif s.name == "vllm:lora_requests_info":
                lora.append((s.value, s.labels.get("running_lora_adapters", "")))
    assert running is not None and waiting is not None and kv is not None
    return running, waiting, kv, max(lora)[1] if lora else ""


def time_per_call(fn: Callable[[], object], repeat: int) -> float:
    """Median microseconds per call over ``repeat`` batches."""
    batch = 20
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - t0) / batch * 1e6)
    return percentile(samples, 50)


async def keep_fresh(endpoints: int, interval: float, seconds: float) -> dict[str, float]:
    server = await asyncio.create_subprocess_exec(sys.executable, str(SERVERS), str(endpoints),
                                                  stdout=asyncio.subprocess.PIPE)
    assert server.stdout is not None
    ports = [int(p) for p in (await server.stdout.readline()).split()]
    if len(ports) != endpoints:
        server.kill()
        await server.wait()
        raise SystemExit(f"scrape_bench: the metrics servers did not start ({len(ports)} of {endpoints} ports)")
    store = Datastore()
    store.set_pool(Pool("bench", endpoints=tuple(Endpoint(f"127.0.0.1:{p}", f"pod-{i}") for i, p in enumerate(ports))))
    supervisor = Supervisor()
    loops = ScrapeLoops(store, supervisor, interval=interval, timeout=max(0.25, 5 * interval))
    try:
        loops.start()
        await asyncio.sleep(1.0)  # warm up connections
        ok0 = sum(s.successes for s in loops.scrapers.values())
        err0 = sum(s.errors for s in loops.scrapers.values())
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu1, t1 = time.process_time(), time.perf_counter()
        ok = sum(s.successes for s in loops.scrapers.values()) - ok0
        err = sum(s.errors for s in loops.scrapers.values()) - err0
        now = time.monotonic()
        ages = [now - m.updated_at for e in store.endpoints() if (m := store.metrics(e.address))]
    finally:
        await supervisor.aclose()  # cancels the scrape loops and waits for them to exit
        loops.close()  # and closes their connections
        server.terminate()
        await server.wait()
    wall = t1 - t0
    return {
        "cpu_pct": 100 * (cpu1 - cpu0) / wall,
        "scrapes_per_s": ok / wall,
        "target_scrapes_per_s": endpoints / interval,
        "errors": err,
        "age_p50_ms": 1e3 * percentile(ages, 50),
        "age_max_ms": 1e3 * percentile(ages, 100),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoints", type=positive_int, default=200, help="metrics servers to scrape (200)")
    ap.add_argument("--interval", type=duration, default=0.05, help="scrape interval, e.g. 50ms (50ms)")
    ap.add_argument("--seconds", type=positive_float, default=10.0, help="measured seconds of scraping (10)")
    ap.add_argument("--repeat", type=positive_int, default=200, help="timed batches of parses (200)")
    ap.add_argument("--json", action="store_true", help="one JSON object per run on stdout; text to stderr")
    return ap.parse_args(argv)


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Output(args.json)
    page = vllm_exposition()
    assert parse_metrics(page, VLLM, 0).running == prometheus_client_parse(page)[0]
    fast = time_per_call(lambda: parse_metrics(page, VLLM, 0.0), args.repeat)
    slow = time_per_call(lambda: prometheus_client_parse(page), max(20, args.repeat // 10))
    fresh = await keep_fresh(args.endpoints, args.interval, args.seconds)
    # end-to-end CPU seconds per scrape, and the interval one core would sustain for this many endpoints
    cost_s = fresh["cpu_pct"] / 100 / fresh["scrapes_per_s"] if fresh["scrapes_per_s"] else math.nan
    row: dict[str, Any] = {
        "bench": "scrape_bench",
        "endpoints": args.endpoints,
        "interval_ms": round(args.interval * 1e3, 3),
        "seconds": args.seconds,
        "page_bytes": len(page),
        "us_per_scrape_fast": round(fast, 1),
        "us_per_scrape_prometheus_client": round(slow, 1),
        "speedup": round(slow / fast, 1),
        "cpu_pct": round(fresh["cpu_pct"], 1),
        "scrapes_per_s": round(fresh["scrapes_per_s"]),
        "target_scrapes_per_s": round(fresh["target_scrapes_per_s"]),
        "us_cpu_per_scrape_end_to_end": round(cost_s * 1e6, 1),
        "one_core_interval_ms": round(args.endpoints * cost_s * 1e3, 1),
        "errors": fresh["errors"],
        "age_p50_ms": round(fresh["age_p50_ms"], 1),
        "age_max_ms": round(fresh["age_max_ms"], 1),
    }
    out.row(row)
    out.say(f"parse one {len(page) / 1024:.0f} KB vLLM page: epp {fast:.0f} µs, prometheus_client {slow:.0f} µs "
            f"({slow / fast:.1f}x)")
    out.say(f"{args.endpoints} endpoints every {args.interval * 1000:.0f} ms for {args.seconds:g} s: "
            f"{fresh['cpu_pct']:.0f}% of one core, {fresh['scrapes_per_s']:.0f}/{fresh['target_scrapes_per_s']:.0f} "
            f"scrapes/s, {fresh['errors']} errors, metric age p50 {fresh['age_p50_ms']:.0f} ms "
            f"max {fresh['age_max_ms']:.0f} ms")
    out.say(f"end-to-end CPU per scrape {cost_s * 1e6:.0f} µs → one core keeps {args.endpoints} endpoints fresh "
            f"every {args.endpoints * cost_s * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
