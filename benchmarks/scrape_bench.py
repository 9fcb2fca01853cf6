"""Cost of reading model-server metrics.

1. Parse cost of one 40 KB vLLM 0.33 /metrics page (median of many runs):
   epp's targeted parser (``parse_metrics``) vs prometheus_client's text parser
   extracting the same values.
2. Keeping N endpoints fresh at an interval: epp's real scrape loops (aiohttp,
   ``?name[]=`` filtering, parsing, datastore updates) against N metrics servers run
   in a separate process; reports the CPU share of one core used by the scraping
   process and the scrapes per second achieved vs the target.

    python benchmarks/scrape_bench.py [--endpoints 200] [--interval 50ms] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import orjson
import uvloop
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from epp.config import parse_duration
from epp.datalayer import Datastore
from epp.datalayer.engines import ENGINES
from epp.datalayer.exposition import parse_metrics
from epp.datalayer.scraper import ScrapeLoops
from epp.domain import Endpoint
from vllm_page import vllm_exposition

VLLM = ENGINES["vllm"]
TESTS_DIR = str(Path(__file__).resolve().parent.parent / "tests")


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


def time_per_call(fn, repeat: int) -> float:
    """Median microseconds per call over ``repeat`` batches."""
    batch = 20
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - t0) / batch * 1e6)
    return statistics.median(samples)


SERVER = r'''
import asyncio, sys
from aiohttp import web
sys.path.insert(0, sys.argv[2])
from vllm_page import vllm_exposition
full = vllm_exposition()
keep = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info", "vllm:cache_config_info")
lines, on = [], False
for line in full.splitlines(True):
    if line.startswith("# HELP "):
        on = line.split()[2] in keep
    if on:
        lines.append(line)
filtered = "".join(lines).encode()
async def metrics(request):
    body = filtered if request.query.getall("name[]", []) else full.encode()
    return web.Response(body=body, content_type="text/plain")
async def main():
    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for _ in range(int(sys.argv[1])):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])
    print(" ".join(map(str, ports)), flush=True)
    await asyncio.Event().wait()
import uvloop
uvloop.run(main())
'''


async def keep_fresh(endpoints: int, interval: float, seconds: float) -> dict[str, float]:
    tests_dir = TESTS_DIR
    server = await asyncio.create_subprocess_exec(sys.executable, "-c", SERVER, str(endpoints), tests_dir,
                                                  stdout=asyncio.subprocess.PIPE)
    assert server.stdout is not None
    ports = [int(p) for p in (await server.stdout.readline()).split()]
    store = Datastore("bench")
    store.set_pool([Endpoint(f"127.0.0.1:{p}", f"pod-{i}") for i, p in enumerate(ports)])
    loops = ScrapeLoops(store, interval=interval, timeout=max(0.25, 5 * interval))
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
        ages = sorted(now - m.updated_at for e in store.endpoints() if (m := store.metrics(e.address)))
    finally:
        await loops.aclose()
        server.terminate()
        await server.wait()
    wall = t1 - t0
    return {
        "cpu_pct": 100 * (cpu1 - cpu0) / wall,
        "scrapes_per_s": ok / wall,
        "target_scrapes_per_s": endpoints / interval,
        "errors": err,
        "age_p50_ms": 1e3 * statistics.median(ages) if ages else float("nan"),
        "age_max_ms": 1e3 * ages[-1] if ages else float("nan"),
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoints", type=int, default=200)
    ap.add_argument("--interval", type=parse_duration, default=0.05)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    page = vllm_exposition()
    assert parse_metrics(page, VLLM, 0).running == prometheus_client_parse(page)[0]
    fast = time_per_call(lambda: parse_metrics(page, VLLM, 0.0), args.repeat)
    slow = time_per_call(lambda: prometheus_client_parse(page), max(20, args.repeat // 10))
    fresh = await keep_fresh(args.endpoints, args.interval, args.seconds)
    # fall-back interval one core would sustain at this per-scrape cost
    cost_s = fresh["cpu_pct"] / 100 / fresh["scrapes_per_s"] if fresh["scrapes_per_s"] else float("nan")
    row = {
        "bench": "scrape_bench",
        "page_bytes": len(page),
        "us_per_scrape_fast": round(fast, 1),
        "us_per_scrape_prometheus_client": round(slow, 1),
        "speedup": round(slow / fast, 1),
        "endpoints": args.endpoints,
        "interval_s": args.interval,
        f"cpu_pct_{args.endpoints}_endpoints_{int(args.interval * 1000)}ms": round(fresh["cpu_pct"], 1),
        "cpu_pct_200_endpoints_50ms": round(fresh["cpu_pct"], 1) if (args.endpoints, args.interval) == (200, 0.05)
        else None,
        "scrapes_per_s": round(fresh["scrapes_per_s"]),
        "target_scrapes_per_s": round(fresh["target_scrapes_per_s"]),
        "us_cpu_per_scrape_end_to_end": round(cost_s * 1e6, 1),
        "interval_one_core_sustains_ms_200": round(200 * cost_s * 1e3, 1),
        "errors": fresh["errors"],
        "age_p50_ms": round(fresh["age_p50_ms"], 1),
        "age_max_ms": round(fresh["age_max_ms"], 1),
    }
    if args.json:
        print(orjson.dumps(row).decode())
    else:
        print(f"parse one {len(page) / 1024:.0f} KB vLLM page: epp {fast:.0f} µs, prometheus_client {slow:.0f} µs "
              f"({slow / fast:.1f}x)")
        print(f"{args.endpoints} endpoints every {args.interval * 1000:.0f} ms for {args.seconds:.0f} s: "
              f"{fresh['cpu_pct']:.0f}% of one core, {fresh['scrapes_per_s']:.0f}/{fresh['target_scrapes_per_s']:.0f} "
              f"scrapes/s, {fresh['errors']} errors, metric age p50 {fresh['age_p50_ms']:.0f} ms "
              f"max {fresh['age_max_ms']:.0f} ms")
        print(f"end-to-end CPU per scrape {cost_s * 1e6:.0f} µs → one core keeps 200 endpoints fresh every "
              f"{200 * cost_s * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
