"""Parts of `e2e_overhead.py` that run as their own processes, and the children they run in.

Two subcommands, each a separate process so its CPU is never counted as the processor's:

    python benchmarks/_e2e.py upstreams [--count 2] [--sse-chunks 64] [--sse-gap-ms 0]
        `count` fast aiohttp model-server stand-ins on 127.0.0.1, port 0 each; prints one line
        {"event": "ready", "ports": [N, ...]} on stdout, serves until SIGTERM. POST
        /v1/chat/completions answers the reference chat request with one JSON completion, or
        (when the body asks for `"stream": true`) with an SSE stream of `sse-chunks` events,
        each its own write (`sse-gap-ms` apart; at 0 Envoy may read several in one go);
        GET /health, /v1/models and /metrics answer what vllm-router asks.

    python benchmarks/_e2e.py openloop --url URL --body-file F --rate R --duration D
        An open-loop client (wrk has no open loop and wrk2 is not packaged here): request i is
        due at start + i / R whatever happened to the others; its latency runs from when it
        was due, so a slow server is not hidden by the client waiting for it (coordinated
        omission). Prints one JSON line: requests, errors, rps, p50_ms, p99_ms.

`Children` is the one owner of every process `e2e_overhead.py` starts: each is killed at
exit, on an exception and on Ctrl-C (and, should the event loop itself die, by an atexit
hook), never by name.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from _stats import percentile  # no epp import here: these processes stay independent of it

__all__ = ["Child", "Children", "cpu_seconds", "listening_ports"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_READY_TIMEOUT_S = 60.0
_TERM_GRACE_S = 5.0


# ---- process bookkeeping ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` so far, from /proc/<pid>/stat (tick resolution)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # the command name (field 2) may hold spaces: split after its closing parenthesis
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of proc(5)


def listening_ports(pid: int) -> list[int]:
    """TCP ports `pid` listens on at 127.0.0.1 (for servers that only log their port)."""
    inodes: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes and local.startswith("0100007F:"):  # LISTEN on 127.0.0.1
                ports.append(int(local.split(":")[1], 16))
    return sorted(ports)


@dataclass
class Child:
    """One started process: its asyncio handle, its stderr file and the ready line it printed."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


_LIVE_PIDS: set[int] = set()


@atexit.register
def _kill_leftovers() -> None:
    # Only reached with children still alive if the event loop died before `Children.aclose`.
    for pid in list(_LIVE_PIDS):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Children:
    """Starts processes and is the only one that stops them (`stop`, `aclose`: SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._children: list[Child] = []
        self._drains: set[asyncio.Task[None]] = set()

    async def start(self, name: str, argv: Sequence[str], *, ready_line: bool = True,
                    env: dict[str, str] | None = None) -> Child:
        """Start `argv`; with `ready_line`, wait for a JSON `{"event": "ready", ...}` line on stdout.

        stderr goes to `<workdir>/<name>.log`; stdout is read to the ready line and then
        drained, so a chatty child never blocks on a full pipe.
        """
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:  # noqa: ASYNC230 - a local file, opened once per child
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log, env=env)
        _LIVE_PIDS.add(proc.pid)
        child = Child(name, proc, log_path)
        self._children.append(child)
        assert proc.stdout is not None
        if ready_line:
            try:
                async with asyncio.timeout(_READY_TIMEOUT_S):
                    while True:
                        line = await proc.stdout.readline()
                        if not line:
                            code = await proc.wait()
                            raise RuntimeError(f"{name} exited (code {code}) before its ready line:\n"
                                               f"{child.log_tail()}")
                        with contextlib.suppress(ValueError):
                            doc = orjson.loads(line)
                            if isinstance(doc, dict) and doc.get("event") == "ready":
                                child.ready = doc
                                break
            except TimeoutError:
                await self.stop(child)
                tail = child.log_tail()
                raise RuntimeError(f"{name}: no ready line after {_READY_TIMEOUT_S:.0f} s:\n{tail}") from None
        task = asyncio.get_running_loop().create_task(_drain(proc.stdout))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        return child

    async def stop(self, child: Child) -> None:
        proc = child.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), _TERM_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        _LIVE_PIDS.discard(proc.pid)
        if child in self._children:
            self._children.remove(child)

    async def aclose(self) -> None:
        """Stop every child still running, newest first; safe to call twice."""
        for child in reversed(list(self._children)):
            with contextlib.suppress(Exception):
                await asyncio.shield(self.stop(child))


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(1 << 16):
        pass


# ---- the upstreams ------------------------------------------------------------------------------


def _completion(model: str) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Hello! I am a benchmark upstream."}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    })


def _sse_events(model: str, chunks: int) -> list[bytes]:
    """`chunks` writes: chunks - 1 token events, then the last token with usage and [DONE]."""
    def event(doc: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model}
    token = event(base | {"choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]})
    last = event(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}})
    return [token] * (chunks - 1) + [last + b"data: [DONE]\n\n"]


async def _serve_upstreams(count: int, sse_chunks: int, sse_gap_s: float) -> None:
    from aiohttp import web

    json_body = _completion("bench")
    events = _sse_events("bench", sse_chunks)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream":true' not in body.replace(b" ", b""):
            return web.Response(body=json_body, content_type="application/json")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        for i, chunk in enumerate(events):
            if sse_gap_s and i:
                await asyncio.sleep(sse_gap_s)  # token pacing, as a model server streams
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model"}]})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="", content_type="text/plain")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ports = []
    for _ in range(count):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        ports.append(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    print(json.dumps({"event": "ready", "ports": ports}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


# ---- the open-loop client ---------------------------------------------------------------------------


async def _open_loop(url: str, body: bytes, rate: float, duration: float, max_outstanding: int) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    outstanding = 0
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=30)
    headers = {"content-type": "application/json"}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one(due: float) -> None:
            nonlocal errors, outstanding
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    ok = 200 <= resp.status < 300
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            finally:
                outstanding -= 1
            if ok:
                latencies.append(time.perf_counter() - due)
            else:
                errors += 1

        start = time.perf_counter()
        n = int(rate * duration)
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the arrivals, not synchronisation
            if outstanding >= max_outstanding:
                errors += 1  # the server is this far behind: count it, do not pile on
                continue
            outstanding += 1
            task = asyncio.get_running_loop().create_task(one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)
        elapsed = time.perf_counter() - start
    return {"requests": n, "ok": len(latencies), "errors": errors, "elapsed_s": elapsed,
            "rps": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3}


def main(argv: Sequence[str] | None = None) -> int:
    import uvloop

    p = argparse.ArgumentParser(prog="_e2e.py")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upstreams")
    up.add_argument("--count", type=int, default=2)
    up.add_argument("--sse-chunks", type=int, default=64)
    up.add_argument("--sse-gap-ms", type=float, default=0.0)
    ol = sub.add_parser("openloop")
    ol.add_argument("--url", required=True)
    ol.add_argument("--body-file", type=Path, required=True)
    ol.add_argument("--rate", type=float, required=True)
    ol.add_argument("--duration", type=float, required=True)
    ol.add_argument("--max-outstanding", type=int, default=512)
    args = p.parse_args(argv)
    if args.command == "upstreams":
        uvloop.run(_serve_upstreams(args.count, max(1, args.sse_chunks), args.sse_gap_ms / 1e3))
        return 0
    result = uvloop.run(_open_loop(args.url, args.body_file.read_bytes(), args.rate, args.duration,
                                   args.max_outstanding))
    print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
