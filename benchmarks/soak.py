"""Soak: steady mixed traffic through real Envoy and `epp serve` for N minutes; leaks show up as growth.

Every part is a separate process on 127.0.0.1, each on ports it chose itself (port 0): 2-3
`epp-sim` pods (`fast` profile, so a request takes a few ms), `epp serve` (plaintext
ext_proc unless `--epp-tls`), and Envoy 1.40 running the bootstrap `epp envoy-config`
renders (`render_bootstrap`: ext_proc FULL_DUPLEX_STREAMED, override_host pool cluster).
The client is this process.

The load is open-loop: arrivals follow a seeded Poisson schedule at `--rate` requests/s and
each request starts at its arrival time whether or not earlier ones finished. Kinds come in
shuffled blocks of 33 (so every kind appears in every block of 33 arrivals): completions and
chat, each as JSON and as SSE (`"stream": true`), an unknown model (404 from epp), a body
that is not JSON (400 from epp) and a stream the client abandons after its first event (a
client disconnect mid-stream). Each outcome is *expected* (the status and body its kind
promises), *unexpected*, or a *transport error* (connection failure or timeout).

Measured: epp's and Envoy's RSS (`VmRSS`), open fds and threads from `/proc/<pid>`, sampled
every `--sample-every` seconds from the end of the warm-up (the start row) to the end, after
the load stopped and every stream closed; epp's in-flight gauges from its `/metrics`
(`inference_model_running_requests`, `epp_extproc_streams`,
`inference_pool_per_pod_inflight_requests`) must all read 0 once the load has stopped.

Exit code 1 when any outcome was unexpected or a transport error, an in-flight gauge is not
0 at the end, or epp's open fds grew by more than `--fd-growth-bound` from start to end.
RSS is reported (with the growth in each half of the run, to tell a plateau from a leak),
never judged. With `--json`: one `"row": "sample"` line per sample as it is taken, then one
`"row": "summary"` line.

    python benchmarks/soak.py [--minutes 30] [--rate 30] [--pods 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
import yaml
from prometheus_client.parser import text_string_to_metric_families

from _cli import ArgumentParser, Output, non_negative_float, positive_float, positive_int
from _stats import percentile
from epp.config import load_pool_file
from epp.envoy.config import render_bootstrap
from epp.envoy.process import EnvoyProcess

BENCH = "soak"
MODEL = "/model/llama2"
ADAPTER = "sql-lora"
POOL = "soak"
# one block of arrivals: every kind, shuffled; bad requests and disconnects are about 3 % each
BLOCK = {
    "completions_json": 10,
    "chat_json": 10,
    "completions_sse": 5,
    "chat_sse": 5,
    "unknown_model": 1,
    "malformed_json": 1,
    "disconnect": 1,
}
KINDS = tuple(BLOCK)
EXPECTED_STATUS = {"unknown_model": 404, "malformed_json": 400}  # every other kind: 200
INFLIGHT_GAUGES = (
    "inference_model_running_requests",
    "epp_extproc_streams",
    "inference_pool_per_pod_inflight_requests",
)
START_TIMEOUT_S = 30.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
SETTLE_TIMEOUT_S = 15.0  # after the load: until every in-flight gauge reads 0
SETTLE_POLL_S = 0.05
STOP_GRACE_S = 5.0


# `--tracemalloc`: epp serve with a SIGUSR1 handler. The first signal starts tracemalloc (tracing from
# startup would slow imports down for tens of seconds); the second writes a snapshot of what is still
# allocated of what was allocated since. Each writes its file under another name and renames it into place.
_TRACEMALLOC_BOOT = """
import os, runpy, signal, sys, tracemalloc
frames, out = int(sys.argv.pop(1)), sys.argv.pop(1)
def on_usr1(signum, frame):
    if not tracemalloc.is_tracing():
        tracemalloc.start(frames)
        path = os.path.join(out, "tracemalloc-started")
        open(path + ".part", "w").close()
    else:
        path = os.path.join(out, "snapshot.tracemalloc")
        tracemalloc.take_snapshot().dump(path + ".part")
    os.rename(path + ".part", path)
signal.signal(signal.SIGUSR1, on_usr1)
sys.argv[0] = "epp"
runpy.run_module("epp", run_name="__main__", alter_sys=True)
"""
TRACEMALLOC_FRAMES = 8
SNAPSHOT_TIMEOUT_S = 60.0


class SoakError(Exception):
    """The set-up failed (a process did not start or died): no result."""


# ---- processes ------------------------------------------------------------------------------
def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if not beside.exists():
        raise SoakError(f"{name} not found next to {sys.executable}")
    return str(beside)


@dataclass
class Child:
    """A started process whose stdout we read line by line and whose stderr goes to a log file."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path
    drain: asyncio.Task[None] | None = None

    async def line(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                line = await self.proc.stdout.readline()
        except TimeoutError:
            what = f"{self.name}: no start line within {timeout:g} s"
            raise SoakError(f"{what}; log {self.log}:\n{self.tail()}") from None
        if not line:
            code = await self.proc.wait()
            raise SoakError(f"{self.name} exited (code {code}) during start; log {self.log}:\n{self.tail()}")
        return line

    def keep_draining(self) -> None:
        """Read the rest of stdout so a full pipe never stalls the child."""
        assert self.proc.stdout is not None
        stdout = self.proc.stdout

        async def drain() -> None:
            while await stdout.read(1 << 16):
                pass

        self.drain = asyncio.get_running_loop().create_task(drain())

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self) -> None:
        """SIGTERM, SIGKILL after a grace period; idempotent."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self.drain is not None:
            self.drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.drain


async def spawn(children: list[Child], name: str, argv: Sequence[str], workdir: Path) -> Child:
    log = workdir / f"{name}.log"
    with log.open("wb") as err:  # the child gets its own copy of the descriptor
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err
        )
    child = Child(name, proc, log)
    children.append(child)  # registered before anything can fail, so it is always stopped
    return child


async def start_pod(children: list[Child], i: int, workdir: Path) -> str:
    argv = [_tool("epp-sim"), "--port", "0", "--pods", "1", "--pod-name-prefix", f"soak-{i}", "--model", MODEL,
            "--profile", "fast", "--seed", str(i), "--log-level", "warning"]  # fmt: skip
    child = await spawn(children, f"epp-sim-{i}", argv, workdir)
    line = (await child.line(START_TIMEOUT_S)).decode().split()
    if line[:2] != ["epp-sim", "pod"] or line[3:5] != ["listening", "on"]:
        raise SoakError(f"epp-sim-{i}: unexpected start line {' '.join(line)!r}")
    child.keep_draining()
    return line[5]


async def start_epp(
    children: list[Child], pool: Path, workdir: Path, args: argparse.Namespace
) -> tuple[Child, dict[str, Any]]:
    boot = ["-m", "epp"]
    if args.tracemalloc:
        boot = ["-c", _TRACEMALLOC_BOOT, str(TRACEMALLOC_FRAMES), str(workdir)]
    argv = [sys.executable, *boot, "serve", "--pool-file", str(pool), "--grpc-port", "0",
            "--grpc-health-port", "0", "--metrics-port", "0", "--bind-address", "127.0.0.1",
            f"--secure-serving={'true' if args.epp_tls else 'false'}", "--log-level", args.log_level,
            "--scheduling-profile", args.scheduling_profile]  # fmt: skip
    child = await spawn(children, "epp", argv, workdir)
    ready = orjson.loads(await child.line(START_TIMEOUT_S))
    if not isinstance(ready, dict) or ready.get("event") != "ready":
        raise SoakError(f"epp serve: first stdout line is not the ready line: {ready!r}")
    child.keep_draining()
    return child, ready


@contextlib.asynccontextmanager
async def system(args: argparse.Namespace, workdir: Path, say: Any) -> AsyncIterator[tuple[str, Child, int, int]]:
    """Pods, epp and Envoy; yields (gateway URL, epp child, epp metrics port, Envoy pid). All stopped on exit."""
    children: list[Child] = []
    envoy: EnvoyProcess | None = None
    try:
        pods = list(await asyncio.gather(*(start_pod(children, i, workdir) for i in range(args.pods))))
        say(f"pods: {', '.join(pods)} (epp-sim, fast profile)")
        pool = workdir / "pool.yaml"
        pool.write_text(yaml.safe_dump({
            "pool": {"name": POOL, "engine": "vllm", "failureMode": "FailClose", "endpoints": pods},
            "models": [{"modelName": MODEL, "targetModels": [{"name": MODEL, "weight": 100}]},
                       {"modelName": ADAPTER}],
        }, sort_keys=False))  # fmt: skip
        epp, ready = await start_epp(children, pool, workdir, args)
        say(f"epp serve: pid {epp.proc.pid}, ext_proc 127.0.0.1:{ready['grpc_port']} "
            f"({'TLS' if ready['tls'] else 'plaintext'}), metrics 127.0.0.1:{ready['metrics_port']}")
        config = render_bootstrap(load_pool_file(pool), listen_port=0, epp_address=f"127.0.0.1:{ready['grpc_port']}",
                                  epp_tls=bool(ready["tls"]), access_log_path=str(workdir / "envoy-access.log"))
        envoy = EnvoyProcess(config, workdir=workdir / "envoy")
        await envoy.start(timeout=START_TIMEOUT_S)
        assert envoy.pid is not None
        gateway = "http://" + await envoy.listener_address()
        say(f"envoy: pid {envoy.pid}, gateway {gateway}")
        yield gateway, epp, int(ready["metrics_port"]), envoy.pid
    finally:
        if envoy is not None:
            await envoy.aclose()
        await asyncio.gather(*(c.stop() for c in reversed(children)))


# ---- what we measure of a process --------------------------------------------------------------
def proc_stats(pid: int) -> dict[str, int]:
    """RSS (kB), open fds and threads of a live process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(fields["Threads"])}  # fmt: skip


async def inflight(http: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    """epp's in-flight gauges (each summed over its labels) from its /metrics page."""
    async with http.get(metrics_url) as r:
        r.raise_for_status()
        text = await r.text()
    sums = dict.fromkeys(INFLIGHT_GAUGES, 0.0)
    found = set()
    for family in text_string_to_metric_families(text):
        if family.name in sums:
            found.add(family.name)
            sums[family.name] += sum(s.value for s in family.samples)
    # a gauge with labels has no sample until its first label set: absent only means never used
    if "epp_extproc_streams" not in found:
        raise SoakError(f"epp's /metrics has no epp_extproc_streams gauge ({metrics_url})")
    return sums


# ---- the load --------------------------------------------------------------------------------
@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    transport: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few unexpected outcomes, for the report
    latencies: list[float] = field(default_factory=list)  # seconds, expected 200s that ran to the end
    lag_max: float = 0.0  # how late the worst arrival started (open-loop schedule)

    def bad(self, kind: str, counter: Counter[str], what: str) -> None:
        counter[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {what}")

    @property
    def done(self) -> int:
        return sum(self.expected.values()) + sum(self.unexpected.values()) + sum(self.transport.values())


def request_for(kind: str, k: int, rng: random.Random) -> tuple[str, bytes]:
    """Path and body of the k-th arrival, of this kind."""
    chat = kind.startswith("chat") or (kind in ("unknown_model", "disconnect") and k % 2 == 0)
    model = ADAPTER if k % 4 == 1 else MODEL
    text = f"soak request {k}: say something about the number {rng.randint(0, 10**6)}"
    doc: dict[str, Any] = {"model": model, "max_tokens": rng.randint(4, 16)}
    if chat:
        doc["messages"] = [{"role": "user", "content": text}]
    else:
        doc["prompt"] = text
    if kind.endswith("_sse") or kind == "disconnect":
        doc["stream"] = True
    if kind == "disconnect":
        doc["max_tokens"] = 400  # long enough to be abandoned mid-stream
    if kind == "unknown_model":
        doc["model"] = f"no-such-model-{k % 7}"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = orjson.dumps(doc)
    if kind == "malformed_json":
        body = body[: len(body) // 2]  # cut in the middle: not JSON
    return path, body


def check_body(kind: str, body: bytes) -> str | None:
    """Why a 200 body does not look like its kind's answer, or None when it does."""
    if kind.endswith("_sse"):
        if not body.rstrip().endswith(b"data: [DONE]"):
            return f"stream did not end with data: [DONE] ({body[-80:]!r})"
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"body is not JSON ({body[:80]!r})"
    if not isinstance(doc, dict) or not doc.get("choices"):
        return f"no choices in body ({body[:80]!r})"
    return None


async def one(http: aiohttp.ClientSession, gateway: str, kind: str, k: int, path: str, body: bytes,
              tally: Tally) -> None:
    tally.sent[kind] += 1
    t0 = time.perf_counter()
    try:
        async with http.post(gateway + path, data=body, headers={"content-type": "application/json"},
                             timeout=REQUEST_TIMEOUT) as r:  # fmt: skip
            want = EXPECTED_STATUS.get(kind, 200)
            if kind == "disconnect":
                first = await r.content.readline() if r.status == 200 else b""
                r.close()  # drop the connection mid-stream: Envoy resets the upstream and the ext_proc stream
                if r.status != want or not first.startswith(b"data: "):
                    tally.bad(kind, tally.unexpected, f"status {r.status}, first line {first[:80]!r}")
                else:
                    tally.expected[kind] += 1
                return
            data = await r.read()
            if r.status != want:
                tally.bad(kind, tally.unexpected, f"request {k}: status {r.status} (want {want}): {data[:120]!r}")
                return
            why = check_body(kind, data) if want == 200 else None
            if why is not None:
                tally.bad(kind, tally.unexpected, f"request {k}: {why}")
                return
            tally.expected[kind] += 1
            if want == 200:
                tally.latencies.append(time.perf_counter() - t0)
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.bad(kind, tally.transport, f"request {k}: {type(exc).__name__}: {exc}")


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k for k in text.split(",") if k)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kinds {unknown} (choose from {', '.join(KINDS)})")
    return kinds


async def run_load(http: aiohttp.ClientSession, gateway: str, rate: float, seconds: float, seed: int,
                   tally: Tally, block: dict[str, int] = BLOCK) -> None:
    """Open loop: start each request at its Poisson arrival time; return when all have finished."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    start = loop.time()
    at = 0.0
    kinds: list[str] = []
    k = 0
    try:
        while True:
            at += rng.expovariate(rate)
            if at > seconds:
                break
            if not kinds:
                kinds = [kind for kind, n in block.items() for _ in range(n)]
                rng.shuffle(kinds)
            kind = kinds.pop()
            path, body = request_for(kind, k, rng)
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival schedule itself, not a synchronisation
            else:
                tally.lag_max = max(tally.lag_max, -delay)
            task = loop.create_task(one(http, gateway, kind, k, path, body, tally))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.wait(tasks)
    finally:
        for t in tasks:
            t.cancel()


# ---- sampling and report -----------------------------------------------------------------------
@dataclass
class Sampler:
    http: aiohttp.ClientSession
    metrics_url: str
    epp_pid: int
    envoy_pid: int
    tally: Tally
    out: Output
    t0: float = field(default_factory=time.monotonic)
    rows: list[dict[str, Any]] = field(default_factory=list)

    async def sample(self, phase: str) -> dict[str, Any]:
        epp, envoy = proc_stats(self.epp_pid), proc_stats(self.envoy_pid)
        gauges = await inflight(self.http, self.metrics_url)
        row = {"bench": BENCH, "row": "sample", "phase": phase, "t_s": round(time.monotonic() - self.t0, 1),
               "requests_done": self.tally.done, **{f"epp_{k}": v for k, v in epp.items()},
               **{f"envoy_{k}": v for k, v in envoy.items()},
               "inflight": gauges["inference_model_running_requests"], "streams": gauges["epp_extproc_streams"],
               "pod_inflight": gauges["inference_pool_per_pod_inflight_requests"]}  # fmt: skip
        self.rows.append(row)
        self.out.row(row)
        self.out.say(f"{phase:>6} {row['t_s']:>8.1f} {row['requests_done']:>9} {epp['rss_kb'] / 1024:>9.1f} "
                     f"{epp['fds']:>5} {epp['threads']:>4} {envoy['rss_kb'] / 1024:>10.1f} {envoy['fds']:>5} "
                     f"{row['inflight']:>5.0f} {row['streams']:>5.0f}")  # fmt: skip
        return row

    async def every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)  # a sampling period, not a synchronisation
            await self.sample("load")


async def settle(http: aiohttp.ClientSession, metrics_url: str) -> tuple[dict[str, float], float]:
    """Poll epp's gauges (a foreign process: nothing to await) until all read 0, bounded; (gauges, seconds)."""
    t0 = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while True:
                gauges = await inflight(http, metrics_url)
                if all(v == 0 for v in gauges.values()):
                    return gauges, time.monotonic() - t0
                await asyncio.sleep(SETTLE_POLL_S)
    return await inflight(http, metrics_url), time.monotonic() - t0


async def signal_and_wait(pid: int, path: Path) -> None:
    """SIGUSR1 to epp (started with `--tracemalloc`); wait, bounded, for the file its handler writes."""
    os.kill(pid, signal.SIGUSR1)
    async with asyncio.timeout(SNAPSHOT_TIMEOUT_S):
        while True:
            if await asyncio.to_thread(path.exists):
                return
            await asyncio.sleep(SETTLE_POLL_S)  # another process writes it: nothing to await


async def heap_growth(pid: int, workdir: Path, top: int = 12) -> list[dict[str, Any]]:
    """The source lines holding the most memory allocated since tracing started and still live."""
    path = workdir / "snapshot.tracemalloc"
    await signal_and_wait(pid, path)
    snapshot = await asyncio.to_thread(tracemalloc.Snapshot.load, str(path))
    snapshot = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    rows = []
    for stat in snapshot.statistics("lineno")[:top]:
        frame = stat.traceback[0]
        rows.append({"where": f"{frame.filename}:{frame.lineno}", "size_kb": round(stat.size / 1024, 1),
                     "count": stat.count})  # fmt: skip
    return rows


def half_growth(samples: Sequence[dict[str, Any]], key: str) -> tuple[float, float]:
    """Growth of `key` over the first and the second half of the samples (by time)."""
    if len(samples) < 3:
        return (float("nan"), float("nan"))
    mid_t = (samples[0]["t_s"] + samples[-1]["t_s"]) / 2
    mid = min(samples, key=lambda s: abs(s["t_s"] - mid_t))
    return (mid[key] - samples[0][key], samples[-1][key] - mid[key])


def summary(args: argparse.Namespace, tally: Tally, samples: Sequence[dict[str, Any]], end_gauges: dict[str, float],
            settle_s: float, load_s: float, heap: list[dict[str, Any]]) -> dict[str, Any]:
    start, end = samples[0], samples[-1]
    failures = []
    unexpected, transport = sum(tally.unexpected.values()), sum(tally.transport.values())
    if unexpected:
        failures.append(f"{unexpected} unexpected outcomes")
    if transport:
        failures.append(f"{transport} transport errors")
    if any(v != 0 for v in end_gauges.values()):
        failures.append(f"in-flight not 0 after the load: {end_gauges}")
    fd_growth = end["epp_fds"] - start["epp_fds"]
    if fd_growth > args.fd_growth_bound:
        failures.append(f"epp's open fds grew by {fd_growth} (bound {args.fd_growth_bound})")
    rss_h1, rss_h2 = half_growth(samples, "epp_rss_kb")
    lat = sorted(tally.latencies)
    return {
        "bench": BENCH, "row": "summary", "minutes": args.minutes, "rate": args.rate, "pods": args.pods,
        "epp_tls": args.epp_tls, "scheduling_profile": args.scheduling_profile,
        "warmup_s": args.warmup, "load_s": round(load_s, 1),
        "requests": sum(tally.sent.values()),
        "achieved_rate": round(sum(tally.sent.values()) / (args.warmup + args.minutes * 60), 2),
        "expected": sum(tally.expected.values()), "unexpected": unexpected, "transport_errors": transport,
        "kinds": {k: {"sent": tally.sent[k], "expected": tally.expected[k], "unexpected": tally.unexpected[k],
                      "transport_errors": tally.transport[k]} for k in KINDS},
        "unexpected_examples": tally.examples,
        "latency_p50_ms": round(percentile(lat, 50) * 1e3, 2), "latency_p99_ms": round(percentile(lat, 99) * 1e3, 2),
        "schedule_lag_max_ms": round(tally.lag_max * 1e3, 1),
        "inflight_end": end_gauges["inference_model_running_requests"],
        "streams_end": end_gauges["epp_extproc_streams"],
        "pod_inflight_end": end_gauges["inference_pool_per_pod_inflight_requests"],
        "inflight_settle_s": round(settle_s, 3),
        "epp_rss_kb_start": start["epp_rss_kb"], "epp_rss_kb_end": end["epp_rss_kb"],
        "epp_rss_kb_max": max(s["epp_rss_kb"] for s in samples),
        "epp_rss_growth_first_half_kb": rss_h1, "epp_rss_growth_second_half_kb": rss_h2,
        "epp_fds_start": start["epp_fds"], "epp_fds_end": end["epp_fds"], "epp_fd_growth": fd_growth,
        "fd_growth_bound": args.fd_growth_bound,
        "epp_threads_start": start["epp_threads"], "epp_threads_end": end["epp_threads"],
        "envoy_rss_kb_start": start["envoy_rss_kb"], "envoy_rss_kb_end": end["envoy_rss_kb"],
        "envoy_fds_start": start["envoy_fds"], "envoy_fds_end": end["envoy_fds"],
        "heap_growth_top": heap, "samples": len(samples), "ok": not failures, "failures": failures,
    }  # fmt: skip


def say_summary(out: Output, s: dict[str, Any]) -> None:
    out.say("")
    out.say(f"{'kind':<18} {'sent':>7} {'expected':>9} {'unexpected':>11} {'transport':>10}")
    for kind, c in s["kinds"].items():
        out.say(f"{kind:<18} {c['sent']:>7} {c['expected']:>9} {c['unexpected']:>11} {c['transport_errors']:>10}")
    out.say(f"{'all':<18} {s['requests']:>7} {s['expected']:>9} {s['unexpected']:>11} {s['transport_errors']:>10}")
    for example in s["unexpected_examples"]:
        out.say(f"  {example}")
    out.say("")
    out.say(f"{'measure':<34} {'start':>10} {'end':>10}")
    out.say(f"{'epp RSS MiB':<34} {s['epp_rss_kb_start'] / 1024:>10.1f} {s['epp_rss_kb_end'] / 1024:>10.1f}")
    out.say(f"{'epp open fds':<34} {s['epp_fds_start']:>10} {s['epp_fds_end']:>10}")
    out.say(f"{'epp threads':<34} {s['epp_threads_start']:>10} {s['epp_threads_end']:>10}")
    out.say(f"{'envoy RSS MiB':<34} {s['envoy_rss_kb_start'] / 1024:>10.1f} {s['envoy_rss_kb_end'] / 1024:>10.1f}")
    out.say(f"{'envoy open fds':<34} {s['envoy_fds_start']:>10} {s['envoy_fds_end']:>10}")
    out.say(f"epp RSS growth: first half {s['epp_rss_growth_first_half_kb']} kB, "
            f"second half {s['epp_rss_growth_second_half_kb']} kB (max {s['epp_rss_kb_max'] / 1024:.1f} MiB)")
    out.say(f"in-flight at the end: running {s['inflight_end']:g}, streams {s['streams_end']:g}, "
            f"per-pod {s['pod_inflight_end']:g} (settled in {s['inflight_settle_s']:.2f} s)")
    arrivals_s = s["warmup_s"] + s["minutes"] * 60
    out.say(f"{s['requests']} requests over {arrivals_s:g} s of arrivals, warm-up included "
            f"({s['achieved_rate']:g}/s, target {s['rate']:g}), "
            f"latency p50 {s['latency_p50_ms']} ms, p99 {s['latency_p99_ms']} ms, "
            f"worst arrival lag {s['schedule_lag_max_ms']} ms")
    if s["heap_growth_top"]:
        out.say("")
        out.say("epp's Python heap: allocated after the start sample and still live at the end (tracemalloc)")
        out.say(f"{'kB':>9} {'blocks':>8}  where")
        for h in s["heap_growth_top"]:
            out.say(f"{h['size_kb']:>9.1f} {h['count']:>8}  {h['where']}")
    out.say("PASS" if s["ok"] else "FAIL: " + "; ".join(s["failures"]))


async def soak(args: argparse.Namespace, out: Output, workdir: Path) -> dict[str, Any]:
    seconds = args.minutes * 60
    async with system(args, workdir, out.say) as (gateway, epp, metrics_port, envoy_pid):
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        connector = aiohttp.TCPConnector(limit=0)
        async with (aiohttp.ClientSession(connector=connector) as http,
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as probe):  # fmt: skip
            tally = Tally()
            sampler = Sampler(probe, metrics_url, epp.proc.pid, envoy_pid, tally, out)
            out.say(f"load: {args.rate:g} req/s open loop, {args.warmup:g} s warm-up, then {seconds:g} s measured")
            out.say(f"{'phase':>6} {'t s':>8} {'requests':>9} {'epp MiB':>9} {'fds':>5} {'thr':>4} "
                    f"{'envoy MiB':>10} {'fds':>5} {'infl':>5} {'strm':>5}")
            loop = asyncio.get_running_loop()
            block = {kind: n for kind, n in BLOCK.items() if kind in args.kinds}
            load = loop.create_task(run_load(http, gateway, args.rate, args.warmup + seconds, args.seed, tally, block))
            sampling: asyncio.Task[None] | None = None
            try:
                if args.warmup > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(load), args.warmup)  # the warm-up's length
                sampler.t0 = time.monotonic()
                await sampler.sample("start")
                if args.tracemalloc:
                    await signal_and_wait(epp.proc.pid, workdir / "tracemalloc-started")
                sampling = loop.create_task(sampler.every(args.sample_every))
                await load
            finally:
                if sampling is not None:
                    sampling.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampling
                load.cancel()
            load_s = time.monotonic() - sampler.t0
            if epp.proc.returncode is not None:
                raise SoakError(f"epp serve died (code {epp.proc.returncode}):\n{epp.tail()}")
            end_gauges, settle_s = await settle(probe, metrics_url)
            await sampler.sample("end")
            heap = await heap_growth(epp.proc.pid, workdir) if args.tracemalloc else []
            return summary(args, tally, sampler.rows, end_gauges, settle_s, load_s, heap)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=positive_float, default=30.0, help="measured minutes of load (30)")
    ap.add_argument("--rate", type=positive_float, default=30.0, help="arrivals per second, Poisson (30)")
    ap.add_argument("--pods", type=positive_int, default=3, help="epp-sim pods, one process each (3)")
    ap.add_argument("--warmup", type=non_negative_float, default=5.0,
                    help="seconds of the same load before the start sample (5)")
    ap.add_argument("--sample-every", type=positive_float, default=5.0, help="seconds between samples (5)")
    ap.add_argument("--fd-growth-bound", type=int, default=10,
                    help="most open fds epp may gain from start to end (10)")
    ap.add_argument("--epp-tls", action="store_true", help="TLS between Envoy and epp (self-signed)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="epp's log level (debug: one line per request, to a file)")
    ap.add_argument("--scheduling-profile", default="epp-default", metavar="NAME",
                    help="epp's built-in scheduling profile (epp-default)")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="diagnostic: trace epp's allocations from the start sample on and report what is "
                         "still live at the end, by source line (slows epp; its RSS then includes tracemalloc's)")
    ap.add_argument("--seed", type=int, default=0, help="arrival schedule and request contents (0)")
    ap.add_argument("--kinds", type=_kinds, default=KINDS, metavar="K,K",
                    help=f"only these kinds of request (diagnostics; default all: {','.join(KINDS)})")
    ap.add_argument("--logs", type=Path, default=None, metavar="DIR",
                    help="keep every process's log in DIR (default: a temporary directory)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row on stdout; tables to stderr")
    return ap.parse_args(argv)


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Output(args.json)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # same clean-up as Ctrl-C
    with tempfile.TemporaryDirectory(prefix="epp-soak-") as d:
        workdir = args.logs or Path(d)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            s = await soak(args, out, workdir)
        except (SoakError, OSError) as exc:
            print(f"soak: {exc}", file=sys.stderr)
            return 1
        except asyncio.CancelledError:  # SIGTERM or Ctrl-C: every process is stopped by now
            print("soak: interrupted, no summary", file=sys.stderr)
            return 130
    say_summary(out, s)
    out.row(s)
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(uvloop.run(main()))
