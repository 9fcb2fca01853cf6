"""Load on `epp serve` over real gRPC: full ext_proc exchanges per second and latency.

One "exchange" is what Envoy does for one HTTP request in FULL_DUPLEX_STREAMED mode:
request headers → request body (end of stream) → [headers reply + body reply]
→ response headers → [reply] → response body (end of stream) → [reply] → close.
The client is a separate process from the server (both share this machine's cores),
so figures are end-to-end including the client's own cost; compare runs made in the
same invocation, not across machines.

    python benchmarks/extproc_load.py [--endpoints 100] [--concurrency 32] [--duration 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import orjson
import uvloop
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from messages import request_body, request_headers, response_body, response_headers

STARTED = re.compile(rb"ext_proc :(\d+)")


async def start_epp(endpoints: int, workdir: Path, log_level: str) -> tuple[asyncio.subprocess.Process, int]:
    pool = workdir / "pool.yaml"
    # loopback addresses only; nothing listens there and, with scraping off, nothing dials them
    addresses = [f"127.{1 + i // 250}.{i % 250}.1:8000" for i in range(endpoints)]
    pool.write_text(yaml.safe_dump({
        "pool": {"name": "bench", "endpoints": addresses},
        "models": [{"modelName": "m", "targetModels": [{"name": "m", "weight": 1}]}],
    }))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp", "serve", "--pool-file", str(pool), "--grpc-port", "0",
        "--grpc-health-port", "0", "--metrics-port", "0", "--bind-address", "127.0.0.1",
        "--secure-serving=false", "--log-level", log_level, "--refresh-metrics-interval", "0",
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        while True:
            line = await proc.stderr.readline()
            if not line:
                raise RuntimeError("epp exited during start")
            if m := STARTED.search(line):
                asyncio.get_running_loop().create_task(_drain(proc.stderr))
                return proc, int(m[1])


async def _drain(stream: asyncio.StreamReader) -> None:
    """Keep reading epp's log so a full pipe never stalls it (one INFO line per request)."""
    while await stream.read(1 << 16):
        pass


def messages(prompt_chars: int) -> tuple[list[object], bytes]:
    body = orjson.dumps({"model": "m", "prompt": "x" * prompt_chars, "max_tokens": 16})
    out = orjson.dumps({"model": "m", "choices": [{"text": "ok"}],
                        "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": 16}})
    return [request_headers({"content-type": "application/json"}), request_body(body, True),
            response_headers(200, {"content-type": "application/json"}), response_body(out, True)], body


async def exchange(stub: pb_grpc.ExternalProcessorStub, msgs: list[object]) -> None:
    call = stub.Process()
    await call.write(msgs[0])
    await call.write(msgs[1])
    await call.read()  # headers reply (destination)
    await call.read()  # body reply
    await call.write(msgs[2])
    await call.read()
    await call.write(msgs[3])
    await call.read()
    await call.done_writing()
    await call.read()  # EOF


async def run_load(port: int, concurrency: int, duration: float, connections: int, prompt_chars: int,
                   warmup: float) -> dict[str, float]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    stubs = [pb_grpc.ExternalProcessorStub(ch) for ch in channels]
    msgs, _ = messages(prompt_chars)
    latencies: list[float] = []
    errors = 0
    measuring = False
    deadline = 0.0

    async def worker(i: int) -> None:
        nonlocal errors
        stub = stubs[i % len(stubs)]
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                await exchange(stub, msgs)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            if measuring:
                latencies.append(time.perf_counter() - t0)

    deadline = time.perf_counter() + warmup
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    measuring = True
    start = time.perf_counter()
    deadline = start + duration
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    for ch in channels:
        await ch.close()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / elapsed,
            "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoints", type=int, default=100)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--prompt-chars", type=int, default=1000)
    ap.add_argument("--log-level", default="info", help="epp's log level (info = one line per request)")
    ap.add_argument("--json", action="store_true", help="one JSON line per run instead of a table")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        proc, port = await start_epp(args.endpoints, Path(d), args.log_level)
        try:
            rows = []
            for c in args.concurrency:
                r = await run_load(port, c, args.duration, args.connections, args.prompt_chars, args.warmup)
                row = {"bench": "extproc_load", "endpoints": args.endpoints, "concurrency": c,
                       "prompt_chars": args.prompt_chars, **{k: round(v, 3) for k, v in r.items()}}
                rows.append(row)
                if args.json:
                    print(orjson.dumps(row).decode(), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    if not args.json:
        print(f"epp serve, {args.endpoints} endpoints, {args.prompt_chars}-char prompts, "
              f"{args.connections} HTTP/2 connections, {args.duration:.0f}s per row")
        print(f"{'concurrency':>11} {'exchanges/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for row in rows:
            print(f"{row['concurrency']:>11} {row['rps']:>12.0f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
                  f"{row['errors']:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
