"""Load on `epp serve` over real gRPC: full ext_proc exchanges per second and latency.

One "exchange" is what Envoy does for one HTTP request in FULL_DUPLEX_STREAMED mode:
request headers → request body (end of stream) → [headers reply + body reply]
→ response headers → [reply] → response body (end of stream) → [reply] → close.
The client is a separate process from the server (both share this machine's cores),
so figures are end-to-end including the client's own cost; compare runs made in the
same invocation, not across machines.

One result row per concurrency level; latencies are per exchange, percentiles as in `_stats.py`.

    python benchmarks/extproc_load.py [--endpoints 100] [--concurrency 1 16 64] [--duration 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import orjson
import uvloop
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from _cli import ArgumentParser, Output, non_negative_float, positive_float, positive_int
from _stats import percentile

FULL_DUPLEX_STREAMED = 4  # ProcessingMode.BodySendMode


def _header_map(headers: Mapping[str, str]) -> Any:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


def request_headers(headers: Mapping[str, str]) -> Any:
    """What Envoy sends first: a POST's request headers, both bodies in FULL_DUPLEX_STREAMED mode."""
    all_headers = {":method": "POST", ":path": "/v1/completions", ":authority": "gw", ":scheme": "http", **headers}
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_header_map(all_headers)))
    msg.protocol_config.request_body_mode = FULL_DUPLEX_STREAMED
    msg.protocol_config.response_body_mode = FULL_DUPLEX_STREAMED
    return msg


def request_body(body: bytes, end_of_stream: bool) -> Any:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def response_headers(status: int, headers: Mapping[str, str]) -> Any:
    all_headers = {":status": str(status), **headers}
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=_header_map(all_headers)))


def response_body(body: bytes, end_of_stream: bool) -> Any:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


async def start_epp(endpoints: int, workdir: Path, log_level: str) -> tuple[asyncio.subprocess.Process, int]:
    """Start `epp serve` and wait for its ready line (one JSON object on stdout) for the gRPC port."""
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
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    log_tail: list[bytes] = []
    loop = asyncio.get_running_loop()
    _background.add(loop.create_task(_drain(proc.stderr, log_tail)))
    async with asyncio.timeout(30):
        while line := await proc.stdout.readline():
            with contextlib.suppress(ValueError):
                ready = orjson.loads(line)
                if isinstance(ready, dict) and ready.get("event") == "ready":
                    _background.add(loop.create_task(_drain(proc.stdout, [])))
                    return proc, int(ready["grpc_port"])
        await proc.wait()
    lines = b"".join(log_tail).decode(errors="replace").strip().splitlines()
    last = lines[-1] if lines else f"exit code {proc.returncode}"
    raise SystemExit(f"extproc_load: epp serve exited during start: {last}")


_background: set[asyncio.Task[None]] = set()  # the drain tasks (the loop keeps only weak references)


async def _drain(stream: asyncio.StreamReader, tail: list[bytes]) -> None:
    """Keep reading epp's output so a full pipe never stalls it (a line per request at debug); keep its end."""
    while chunk := await stream.read(1 << 16):
        tail[:] = [chunk]


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
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / elapsed,
            "p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoints", type=positive_int, default=100, help="endpoints in epp's pool (100)")
    ap.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 16, 64],
                    help="concurrent streams, one row each (1 16 64)")
    ap.add_argument("--connections", type=positive_int, default=4, help="HTTP/2 connections (4)")
    ap.add_argument("--duration", type=positive_float, default=8.0, help="measured seconds per row (8)")
    ap.add_argument("--warmup", type=non_negative_float, default=1.0, help="unmeasured seconds before each row (1)")
    ap.add_argument("--prompt-chars", type=positive_int, default=1000, help="prompt size in characters (1000)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="epp's log level (debug = one line per request)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row on stdout; table to stderr")
    return ap.parse_args(argv)


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Output(args.json)
    out.say(f"epp serve, {args.endpoints} endpoints, {args.prompt_chars}-char prompts, "
            f"{args.connections} HTTP/2 connections, {args.duration:g} s per row")
    out.say(f"{'concurrency':>11} {'exchanges/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    with tempfile.TemporaryDirectory() as d:
        proc, port = await start_epp(args.endpoints, Path(d), args.log_level)
        try:
            for c in args.concurrency:
                r = await run_load(port, c, args.duration, args.connections, args.prompt_chars, args.warmup)
                row = {"bench": "extproc_load", "endpoints": args.endpoints, "concurrency": c,
                       "connections": args.connections, "prompt_chars": args.prompt_chars,
                       "duration_s": args.duration, **{k: round(v, 3) for k, v in r.items()}}
                out.row(row)
                out.say(f"{c:>11} {row['rps']:>12.0f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
                        f"{row['errors']:>7}")
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
