"""What an ext_proc processor costs behind real Envoy: epp against the floor, side by side.

Issue 10's "Why" table, reproduced in one run. Every setup is Envoy 1.40 (`--concurrency 1`)
in front of the same two fast aiohttp upstreams (their own process, so their CPU is not the
processor's), driven by wrk (1 thread) posting the reference chat request:

* `envoy-direct`: epp's rendered bootstrap with the ext_proc filter (and its cluster)
  removed: Envoy alone, round-robin over the pool cluster;
* `envoy-floor-go/<wiring>`, `envoy-floor-py/<wiring>`: the minimal processors of
  `benchmarks/baselines/` (Go on go-control-plane; bare grpc.aio + uvloop), in exactly the
  bootstrap the epp row of that wiring gets, only the ext_proc cluster pointing at them;
* `envoy-epp/<wiring>`: `epp serve` as its own process, plaintext (scraping off: the
  upstreams are not vLLM), endpoints = the upstreams;
* `vllm-router`: the peer row, `vllm-router --policy cache_aware` in front of the same
  upstreams, no Envoy (only if `pip install vllm-router` worked).

Wirings (the `WIRINGS` table; a new one `epp envoy-config` may render is one more entry):
`lean` (the default: request body buffered, response headers only), `full-duplex` and
`buffered` (`epp envoy-config --body-mode ... --lb override-host`) and
`envoy-ai-gateway` (`--wiring envoy-ai-gateway`: TLS to the processor; epp serves TLS
there, the floors stay plaintext: only that cluster's transport socket is removed for
them). `buffered-resp-none` (not run by default) is the buffered bootstrap with response
body NONE and response trailers SKIP, the issue's "minimal" floor mode.

Cells: JSON and SSE (`--sse-chunks` events, each its own upstream write) responses; closed
loop at c=1, 8, 32 (wrk `-t1 -cN`) and open loop at fixed rates (wrk has no open loop and
wrk2 is not packaged here: `_e2e.py openloop`, an aiohttp client in its own process whose
latencies run from each request's due time). Per cell: req/s (2xx only), p50/p99, errors
(non-2xx + socket errors + timeouts), CPU µs per request of the processor and of Envoy
(utime + stime from /proc/<pid>/stat before and after, over the requests wrk made), ext_proc
messages per request (Envoy's `stream_msgs_sent`), and after every epp cell epp's own
in-flight gauges (`inflight_after`: the sum of `inference_pool_per_pod_inflight_requests` and
`inference_model_running_requests` once load has stopped, polled up to 2 s until they and
`epp_extproc_streams` are 0; it must be 0; no per-pod gauge at all gives null, not 0).

`--rounds N` (default 3) runs every setup once per round, in a rotated order, and reports
medians. With `--json`, stdout carries one row per cell (medians) and nothing else.

    python benchmarks/e2e_overhead.py --quick                 # ~4 min on 2 cores
    python benchmarks/e2e_overhead.py --out benchmarks/results/e2e_overhead   # 3 rounds, ~35 min
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
import yaml

from _cli import ArgumentParser, Output, duration, int_list, json_line, positive_int
from _e2e import Child, Children, cpu_seconds, listening_ports

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.baselines and tools/: the repository root, never tests/

from epp.config import PoolFile  # noqa: E402
from epp.demo import SCENARIO_REQUEST  # noqa: E402
from epp.envoy import process as envoy_process  # noqa: E402
from epp.envoy.ai_gateway import render_ai_gateway_bootstrap  # noqa: E402
from epp.envoy.config import render_bootstrap  # noqa: E402

BENCH = "e2e_overhead"
HERE = Path(__file__).resolve().parent
DEFAULT_WIRING = "lean"  # what `epp envoy-config` renders without --wiring/--body-mode
AIGW = "envoy-ai-gateway"
ENVOY_CONCURRENCY = 1
_SETTLE_S = 2.0
_POLL_S = 0.02


# ---- wirings and setups ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Wiring:
    """One Envoy bootstrap shape with an ext_proc processor at `processor_address`."""

    name: str
    render: Callable[[PoolFile, str], dict[str, Any]]
    processor_tls: bool  # the rendered bootstrap dials the processor over TLS
    default: bool = True  # run unless --wirings says otherwise


def _epp_wiring(body_mode: Any) -> Callable[[PoolFile, str], dict[str, Any]]:
    def render(pool: PoolFile, address: str) -> dict[str, Any]:
        return render_bootstrap(pool, listen_port=0, epp_address=address, body_mode=body_mode, lb="override-host")
    return render


def _aigw(pool: PoolFile, address: str) -> dict[str, Any]:
    return render_ai_gateway_bootstrap(pool, listen_port=0, epp_address=address)


def _buffered_resp_none(pool: PoolFile, address: str) -> dict[str, Any]:
    boot = _epp_wiring("buffered")(pool, address)
    mode = ext_proc_config(boot)["processing_mode"]
    mode.update(response_body_mode="NONE", response_trailer_mode="SKIP")
    return boot


WIRINGS: dict[str, Wiring] = {w.name: w for w in (
    Wiring("lean", _epp_wiring("lean"), processor_tls=False),
    Wiring("full-duplex", _epp_wiring("full-duplex"), processor_tls=False),
    Wiring("buffered", _epp_wiring("buffered"), processor_tls=False),
    Wiring(AIGW, _aigw, processor_tls=True),
    Wiring("buffered-resp-none", _buffered_resp_none, processor_tls=False, default=False),
)}

PROCESSORS = ("floor-go", "floor-py", "epp")


@dataclass(frozen=True)
class Setup:
    name: str
    processor: str  # "none" (Envoy alone), "floor-go", "floor-py", "epp", "vllm-router" (no Envoy)
    wiring: str | None


def setups_for(wirings: Sequence[str], with_floors: bool, with_router: bool) -> list[Setup]:
    out = [Setup("envoy-direct", "none", None)]
    for w in wirings:
        for proc in PROCESSORS:
            if proc.startswith("floor") and not with_floors:
                continue
            out.append(Setup(f"envoy-{proc}/{w}", proc, w))
    if with_router:
        out.append(Setup("vllm-router", "vllm-router", None))
    return out


def _ext_proc_filter(boot: dict[str, Any]) -> dict[str, Any]:
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    found = [f for f in hcm["http_filters"] if f["name"].startswith("envoy.filters.http.ext_proc")]
    assert len(found) == 1, "the rendered bootstrap has exactly one ext_proc filter"
    return found[0]


def ext_proc_config(boot: dict[str, Any]) -> dict[str, Any]:
    """The ExternalProcessor config of the ext_proc filter, also when a matcher wraps it."""
    config = _ext_proc_filter(boot)["typed_config"]
    while not config["@type"].endswith(".ExternalProcessor"):
        config = config["extension_config"]["typed_config"]  # ExtensionWithMatcher
    return dict(config)


def without_ext_proc(boot: dict[str, Any]) -> dict[str, Any]:
    """The same bootstrap with its ext_proc filter and the processor's cluster removed."""
    boot = copy.deepcopy(boot)
    cluster = ext_proc_config(boot)["grpc_service"]["envoy_grpc"]["cluster_name"]
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if not f["name"].startswith("envoy.filters.http.ext_proc")]
    res = boot["static_resources"]
    res["clusters"] = [c for c in res["clusters"] if c["name"] != cluster]
    return boot


def plaintext_processor(boot: dict[str, Any]) -> dict[str, Any]:
    """The same bootstrap with the ext_proc cluster's TLS transport socket removed (nothing else)."""
    boot = copy.deepcopy(boot)
    cluster = ext_proc_config(boot)["grpc_service"]["envoy_grpc"]["cluster_name"]
    for c in boot["static_resources"]["clusters"]:
        if c["name"] == cluster:
            c.pop("transport_socket", None)
    return boot


# ---- tools --------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """`wrk` on PATH; installed with apt-get when missing and we are root (like tools/kube/build.py's etcd)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"{BENCH}: wrk is not installed and cannot be installed here (apt-get install wrk as root)")
    from tools.run import run_echoing

    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + 600
    install = ["apt-get", "install", "-y", "--no-install-recommends", "wrk"]
    ran = run_echoing(install, cwd=Path("/"), env=env, deadline=deadline, label="wrk")
    if ran.returncode != 0:
        run_echoing(["apt-get", "update"], cwd=Path("/"), env=env, deadline=deadline, label="wrk")
        ran = run_echoing(install, cwd=Path("/"), env=env, deadline=deadline, label="wrk")
    found = shutil.which("wrk")
    if ran.returncode != 0 or not found:
        raise SystemExit(f"{BENCH}: apt-get install wrk failed:\n{ran.describe()}")
    return found


def find_vllm_router() -> tuple[str | None, str]:
    """The `vllm-router` entry point of this venv (installed with pip if missing), or why not."""
    beside = Path(sys.executable).parent / "vllm-router"
    if not beside.exists():
        ran = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "vllm-router"],
                             check=False, capture_output=True, text=True, timeout=600)
        if ran.returncode != 0:
            last = (ran.stderr.strip().splitlines() or ["pip failed"])[-1]
            return None, f"pip install vllm-router failed: {last}"
    if not beside.exists():
        return None, "pip installed vllm-router but no vllm-router entry point appeared"
    return str(beside), ""


# ---- one cell of load -----------------------------------------------------------------------------

_WRK_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'E2E_RESULT {{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %.1f, "p99_us": %.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""
_WRK_RESULT = re.compile(r"^E2E_RESULT (\{.*\})$", re.MULTILINE)


@dataclass(frozen=True)
class Load:
    kind: str  # "closed" (wrk, `value` connections) or "open" (`value` requests per second)
    value: int

    @property
    def label(self) -> str:
        return f"c={self.value}" if self.kind == "closed" else f"r={self.value}/s"


async def run_wrk(wrk: str, url: str, script: Path, connections: int, seconds: float) -> dict[str, Any]:
    argv = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script), url]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    m = _WRK_RESULT.search(text)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed (rc={proc.returncode}):\n{text[-2000:]}")
    r = orjson.loads(m.group(1))
    seconds_run = r["duration_us"] / 1e6
    socket_errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
    return {"requests": r["requests"], "ok": r["requests"] - r["status"], "errors": r["status"] + socket_errors,
            "elapsed_s": seconds_run, "rps": (r["requests"] - r["status"]) / seconds_run,
            "p50_ms": r["p50_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3}


async def run_open_loop(url: str, body_file: Path, rate: int, seconds: float) -> dict[str, Any]:
    argv = [sys.executable, str(HERE / "_e2e.py"), "openloop", "--url", url, "--body-file", str(body_file),
            "--rate", str(rate), "--duration", str(seconds)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"open-loop client failed (rc={proc.returncode}):\n{err.decode(errors='replace')[-2000:]}")
    return dict(orjson.loads(out.strip().splitlines()[-1]))


# ---- a running setup ------------------------------------------------------------------------------


@dataclass
class Running:
    setup: Setup
    url: str  # where the load goes
    processor: Child | None
    envoy: envoy_process.EnvoyProcess | None
    epp_metrics: str | None  # epp's /metrics URL

    @property
    def proc_pid(self) -> int | None:
        return self.processor.pid if self.processor is not None else None

    @property
    def envoy_pid(self) -> int | None:
        return self.envoy.pid if self.envoy is not None else None


def _free_port() -> int:
    # Only for vllm-router, which refuses --port 0 ("Port must be > 0"); the race this opens
    # is caught below (the port must be listened on by that very pid) and retried.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Bench:
    def __init__(self, args: argparse.Namespace, out: Output, workdir: Path, children: Children) -> None:
        self.args = args
        self.out = out
        self.workdir = workdir
        self.children = children
        self.endpoints: list[str] = []
        self.pool_file_path = workdir / "pool.yaml"
        self.pool: PoolFile | None = None
        self.wrk = ""
        self.router: str | None = None
        self.floor_go: str | None = None
        self.floor_py = ROOT / "benchmarks" / "baselines" / "floor_py.py"
        self.bodies: dict[str, Path] = {}
        self.scripts: dict[str, Path] = {}
        self.envoys = 0

    # -- preparation --

    async def prepare(self) -> None:
        self.wrk = ensure_wrk()
        up = await self.children.start("upstreams", [sys.executable, str(HERE / "_e2e.py"), "upstreams",
                                                      "--count", "2", "--sse-chunks", str(self.args.sse_chunks),
                                                      "--sse-gap-ms", str(self.args.sse_gap_ms)])
        self.endpoints = [f"127.0.0.1:{p}" for p in up.ready["ports"]]
        doc = {"pool": {"name": "bench", "endpoints": self.endpoints}}
        self.pool_file_path.write_text(yaml.safe_dump(doc))
        self.pool = PoolFile.model_validate(doc)
        for kind in ("json", "sse"):
            body = SCENARIO_REQUEST if kind == "json" else {**SCENARIO_REQUEST, "stream": True}
            text = json.dumps(body)
            self.bodies[kind] = self.workdir / f"{kind}.json"
            self.bodies[kind].write_text(text)
            self.scripts[kind] = self.workdir / f"{kind}.lua"
            self.scripts[kind].write_text(_WRK_LUA.format(body=text))

    def prepare_floors(self) -> str:
        """Build/find the floor processors; '' when ready, else why they cannot run."""
        if not self.floor_py.exists():
            return f"{self.floor_py} is missing"
        try:
            from benchmarks.baselines.build import floor_go_binary
        except ImportError as exc:
            return f"benchmarks.baselines.build: {exc}"
        try:
            self.floor_go = str(floor_go_binary())
        except Exception as exc:  # a failed Go build: say why, run without the floors
            return f"floor_go_binary() failed: {exc}"
        return ""

    # -- start / stop one setup --

    async def start(self, setup: Setup) -> Running:
        assert self.pool is not None
        if setup.processor == "vllm-router":
            return await self._start_router(setup)
        if setup.processor == "none":
            boot = without_ext_proc(WIRINGS[DEFAULT_WIRING].render(self.pool, "127.0.0.1:1"))
            return await self._start_envoy(setup, boot, None, None)
        assert setup.wiring is not None
        wiring = WIRINGS[setup.wiring]
        name = setup.processor
        metrics = None
        if setup.processor == "epp":
            tls = "true" if wiring.processor_tls else "false"
            child = await self.children.start("epp", [
                sys.executable, "-m", "epp", "serve", "--pool-file", str(self.pool_file_path),
                "--grpc-port", "0", "--grpc-health-port", "0", "--metrics-port", "0", "--bind-address", "127.0.0.1",
                f"--secure-serving={tls}", "--refresh-metrics-interval", "0", "--log-level", self.args.epp_log_level,
                *self.args.epp_arg])
            port = child.ready["grpc_port"]
            metrics = f"http://127.0.0.1:{child.ready['metrics_port']}/metrics"
        else:
            argv = [self.floor_go] if name == "floor-go" else [sys.executable, str(self.floor_py)]
            assert argv[0] is not None
            child = await self.children.start(name, [*argv, "--address", "127.0.0.1:0",
                                                      "--endpoints", ",".join(self.endpoints)])
            port = child.ready["port"]
        boot = wiring.render(self.pool, f"127.0.0.1:{port}")
        if wiring.processor_tls and setup.processor != "epp":
            boot = plaintext_processor(boot)  # the floors serve plaintext only
        try:
            return await self._start_envoy(setup, boot, child, metrics)
        except BaseException:
            await self.children.stop(child)
            raise

    async def _start_envoy(self, setup: Setup, boot: dict[str, Any], child: Child | None,
                           metrics: str | None) -> Running:
        self.envoys += 1
        envoy = envoy_process.EnvoyProcess(boot, workdir=self.workdir / f"envoy-{self.envoys}",
                                           extra_args=("--concurrency", str(ENVOY_CONCURRENCY)))
        await envoy.start()
        try:
            address = await envoy.listener_address()
            info = await envoy._admin_get_json("/server_info", {})
            concurrency = info.get("command_line_options", {}).get("concurrency")
            if concurrency != ENVOY_CONCURRENCY:
                raise RuntimeError(f"envoy runs with concurrency {concurrency}, not {ENVOY_CONCURRENCY}")
        except BaseException:
            await envoy.aclose()
            raise
        return Running(setup, f"http://{address}/v1/chat/completions", child, envoy, metrics)

    async def _start_router(self, setup: Setup) -> Running:
        assert self.router is not None
        workers = [f"http://{e}" for e in self.endpoints]
        for attempt in range(5):
            port = _free_port()
            child = await self.children.start("vllm-router", [
                self.router, "--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware",
                "--worker-urls", *workers, "--log-level", "warning"], ready_line=False)
            # vllm-router prints no ready line: poll its own listening sockets (bounded)
            try:
                async with asyncio.timeout(30):
                    while child.proc.returncode is None and port not in listening_ports(child.pid):  # noqa: ASYNC110
                        await asyncio.sleep(_POLL_S)  # a foreign process with nothing to await
            except TimeoutError:
                pass
            if child.proc.returncode is None and port in listening_ports(child.pid):
                return Running(setup, f"http://127.0.0.1:{port}/v1/chat/completions", child, None, None)
            await self.children.stop(child)
            self.out.say(f"  vllm-router did not listen on {port} (attempt {attempt + 1}): {child.log_tail(3)}")
        raise RuntimeError("vllm-router never came up")

    async def stop(self, running: Running) -> None:
        if running.envoy is not None:
            await running.envoy.aclose()
        if running.processor is not None:
            await self.children.stop(running.processor)

    # -- cells --

    async def warm(self, running: Running) -> None:
        for kind in ("json", "sse"):
            await run_wrk(self.wrk, running.url, self.scripts[kind], 8, self.args.warmup)

    async def cell(self, running: Running, kind: str, load: Load) -> dict[str, Any]:
        stats0 = await self._extproc_msgs(running)
        cpu0 = self._cpu(running)
        if load.kind == "closed":
            r = await run_wrk(self.wrk, running.url, self.scripts[kind], load.value, self.args.duration)
        else:
            r = await run_open_loop(running.url, self.bodies[kind], load.value, self.args.duration)
        cpu1 = self._cpu(running)
        stats1 = await self._extproc_msgs(running)
        n = max(1, r["requests"])
        proc_cpu = (cpu1[0] - cpu0[0]) / n * 1e6 if cpu0[0] is not None and cpu1[0] is not None else None
        envoy_cpu = (cpu1[1] - cpu0[1]) / n * 1e6 if cpu0[1] is not None and cpu1[1] is not None else None
        msgs = (stats1 - stats0) / n if stats0 is not None and stats1 is not None else None
        inflight, settle_ms = await self._inflight_after(running)
        s = running.setup
        return {
            "bench": BENCH, "setup": s.name, "processor": s.processor, "wiring": s.wiring,
            "response": kind, "load": load.kind, "concurrency": load.value if load.kind == "closed" else None,
            "rate": load.value if load.kind == "open" else None,
            "rps": r["rps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
            "proc_cpu_us": proc_cpu, "envoy_cpu_us": envoy_cpu, "errors": r["errors"],
            "requests": r["requests"], "extproc_msgs_per_req": msgs,
            "inflight_after": inflight, "inflight_settle_ms": settle_ms,
            "sse_chunks": self.args.sse_chunks, "sse_gap_ms": self.args.sse_gap_ms, "duration_s": self.args.duration,
        }

    @staticmethod
    def _cpu(running: Running) -> tuple[float | None, float | None]:
        pp, ep = running.proc_pid, running.envoy_pid
        return (cpu_seconds(pp) if pp is not None else None, cpu_seconds(ep) if ep is not None else None)

    @staticmethod
    async def _extproc_msgs(running: Running) -> int | None:
        if running.envoy is None or running.processor is None:
            return None
        stats = await running.envoy.stats(r"ext_proc\.stream_msgs_sent$")
        return sum(stats.values())

    async def _inflight_after(self, running: Running) -> tuple[float | None, float | None]:
        """epp's in-flight sum once load stopped: polled (epp offers nothing to await) until 0, at most 2 s."""
        if running.epp_metrics is None:
            return None, None
        start = time.perf_counter()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                async with session.get(running.epp_metrics) as resp:
                    text = await resp.text()
                per_pod = list(_samples(text, "inference_pool_per_pod_inflight_requests"))
                if not per_pod:  # no gauge to read is not a zero
                    return None, None
                inflight = sum(per_pod) + sum(_samples(text, "inference_model_running_requests"))
                open_streams = sum(_samples(text, "epp_extproc_streams"))
                waited = time.perf_counter() - start
                if (inflight == 0 and open_streams == 0) or waited > _SETTLE_S:
                    return inflight, round(waited * 1e3, 1)
                await asyncio.sleep(_POLL_S)


def _samples(exposition: str, name: str) -> Iterator[float]:
    for line in exposition.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            yield float(line.rsplit(" ", 1)[1])


# ---- aggregation, tables, plot ------------------------------------------------------------------------

_NUMERIC = ("rps", "p50_ms", "p99_ms", "proc_cpu_us", "envoy_cpu_us", "errors", "requests",
            "extproc_msgs_per_req", "inflight_after", "inflight_settle_ms")


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["setup"], row["response"], row["load"], row["concurrency"], row["rate"])


def medians(rows: Sequence[dict[str, Any]], order: Sequence[str]) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_key(row), []).append(row)
    out = []
    for _, group in groups.items():
        m = dict(group[0])
        for k in _NUMERIC:
            values = [r[k] for r in group if r[k] is not None]
            m[k] = statistics.median(values) if values else None
        # a leak in any round must show: the worst round, not the median
        leaks = [r["inflight_after"] for r in group if r["inflight_after"] is not None]
        m["inflight_after"] = max(leaks) if leaks else None
        m["errors"] = sum(r["errors"] for r in group)
        m["rounds"] = len(group)
        rps = [r["rps"] for r in group]
        m["rps_spread"] = (max(rps) - min(rps)) / m["rps"] if m["rps"] else None
        out.append(m)
    rank = {name: i for i, name in enumerate(order)}
    out.sort(key=lambda r: (r["response"], rank[r["setup"]], r["load"], r["concurrency"] or 0, r["rate"] or 0))
    return out


def _fmt(v: Any, spec: str = ",.0f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def cell_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| setup | response | load | req/s | p50 ms | p99 ms | proc µs/req | Envoy µs/req | ext_proc msgs/req "
            "| errors | inflight_after |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        load = f"c={r['concurrency']}" if r["load"] == "closed" else f"r={r['rate']}/s"
        lines.append(f"| {r['setup']} | {r['response']} | {load} | {_fmt(r['rps'])} | {_fmt(r['p50_ms'], '.2f')} "
                     f"| {_fmt(r['p99_ms'], '.2f')} | {_fmt(r['proc_cpu_us'])} | {_fmt(r['envoy_cpu_us'])} "
                     f"| {_fmt(r['extproc_msgs_per_req'], '.1f')} | {r['errors']} "
                     f"| {_fmt(r['inflight_after'], '.0f')} |")
    return "\n".join(lines)


def _find(rows: Sequence[dict[str, Any]], setup: str, response: str, c: int) -> dict[str, Any] | None:
    for r in rows:
        if r["setup"] == setup and r["response"] == response and r["load"] == "closed" and r["concurrency"] == c:
            return r
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def why_table(rows: Sequence[dict[str, Any]], setups: Sequence[Setup]) -> str:
    """The issue's "Why" table: JSON c=1, JSON c=8 and SSE c=8 per setup."""
    lines = ["| setup | JSON c=1: req/s · p50 | JSON c=8: req/s · p50 · proc CPU/req | SSE c=8: req/s · proc CPU/req |",
             "|---|---|---|---|"]
    for s in setups:
        j1, j8, s8 = _find(rows, s.name, "json", 1), _find(rows, s.name, "json", 8), _find(rows, s.name, "sse", 8)
        a = f"{_fmt(j1['rps'])} · {_fmt(j1['p50_ms'], '.2f')} ms" if j1 else "-"
        b = (f"{_fmt(j8['rps'])} · {_fmt(j8['p50_ms'], '.1f')} ms · {_fmt(j8['proc_cpu_us'])} µs" if j8 else "-")
        c = f"{_fmt(s8['rps'])} · {_fmt(s8['proc_cpu_us'])} µs" if s8 else "-"
        lines.append(f"| {s.name} | {a} | {b} | {c} |")
    return "\n".join(lines)


def ratios(rows: Sequence[dict[str, Any]], wirings: Sequence[str]) -> list[dict[str, Any]]:
    """Per wiring, the ratios issue 10's targets are written in (epp's row over the floors' in that wiring)."""
    out = []
    direct = _find(rows, "envoy-direct", "json", 1)
    for w in wirings:
        epp, go, py = f"envoy-epp/{w}", f"envoy-floor-go/{w}", f"envoy-floor-py/{w}"

        def get(setup: str, resp: str, c: int, k: str) -> float | None:
            r = _find(rows, setup, resp, c)
            return r[k] if r else None

        added_epp = added_go = None
        if direct is not None:
            e1, g1 = get(epp, "json", 1, "p50_ms"), get(go, "json", 1, "p50_ms")
            added_epp = e1 - direct["p50_ms"] if e1 is not None else None
            added_go = g1 - direct["p50_ms"] if g1 is not None else None
        out.append({
            "wiring": w,
            "json_c8_rps_vs_go": _ratio(get(epp, "json", 8, "rps"), get(go, "json", 8, "rps")),
            "json_c8_rps_vs_py": _ratio(get(epp, "json", 8, "rps"), get(py, "json", 8, "rps")),
            "sse_c8_rps_vs_go": _ratio(get(epp, "sse", 8, "rps"), get(go, "sse", 8, "rps")),
            "sse_c8_rps_vs_py": _ratio(get(epp, "sse", 8, "rps"), get(py, "sse", 8, "rps")),
            "added_p50_ms_epp": added_epp, "added_p50_ms_go": added_go,
            "added_p50_vs_go": _ratio(added_epp, added_go),
            "json_c8_cpu_vs_py": _ratio(get(epp, "json", 8, "proc_cpu_us"), get(py, "json", 8, "proc_cpu_us")),
            "sse_c8_cpu_vs_py": _ratio(get(epp, "sse", 8, "proc_cpu_us"), get(py, "sse", 8, "proc_cpu_us")),
        })
    return out


def ratio_table(rs: Sequence[dict[str, Any]]) -> str:
    lines = ["| wiring | JSON c=8 req/s epp/floor-go | epp/floor-py | SSE c=8 req/s epp/floor-go | epp/floor-py "
             "| added p50 c=1 epp / floor-go (ms) | proc CPU epp/floor-py JSON c=8 | SSE c=8 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rs:
        added = (f"{_fmt(r['added_p50_vs_go'], '.2f')} ({_fmt(r['added_p50_ms_epp'], '.2f')} / "
                 f"{_fmt(r['added_p50_ms_go'], '.2f')})")
        lines.append(f"| {r['wiring']} | {_fmt(r['json_c8_rps_vs_go'], '.2f')} | {_fmt(r['json_c8_rps_vs_py'], '.2f')} "
                     f"| {_fmt(r['sse_c8_rps_vs_go'], '.2f')} | {_fmt(r['sse_c8_rps_vs_py'], '.2f')} | {added} "
                     f"| {_fmt(r['json_c8_cpu_vs_py'], '.2f')} | {_fmt(r['sse_c8_cpu_vs_py'], '.2f')} |")
    return "\n".join(lines)


def targets(rs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["wiring"]: r for r in rs}
    d, a = by.get(DEFAULT_WIRING, {}), by.get(AIGW, {})
    checks = [
        ("JSON c=8 req/s epp/floor-go, default wiring", d.get("json_c8_rps_vs_go"), ">=", 0.5),
        ("JSON c=8 req/s epp/floor-py, default wiring", d.get("json_c8_rps_vs_py"), ">=", 1.0),
        ("SSE c=8 req/s epp/floor-go, default wiring", d.get("sse_c8_rps_vs_go"), ">=", 0.6),
        ("SSE c=8 req/s epp/floor-go, envoy-ai-gateway", a.get("sse_c8_rps_vs_go"), ">=", 0.35),
        ("added p50 c=1 epp/floor-go, default wiring", d.get("added_p50_vs_go"), "<=", 1.5),
        ("proc CPU JSON c=8 epp/floor-py, full-duplex", by.get("full-duplex", {}).get("json_c8_cpu_vs_py"), "<=", 1.3),
        ("proc CPU SSE c=8 epp/floor-py, full-duplex", by.get("full-duplex", {}).get("sse_c8_cpu_vs_py"), "<=", 1.3),
    ]
    out = []
    for name, value, op, target in checks:
        ok = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"check": name, "ratio": value, "target": f"{op} {target}", "pass": ok})
    leaks = [r["inflight_after"] for r in rows if r["inflight_after"] is not None]
    out.append({"check": "epp in-flight after every cell (max)", "ratio": max(leaks) if leaks else None,
                "target": "== 0", "pass": (max(leaks) == 0) if leaks else None})
    return out


def target_table(ts: Sequence[dict[str, Any]]) -> str:
    lines = ["| check | measured | target | |", "|---|---|---|---|"]
    for t in ts:
        verdict = "-" if t["pass"] is None else "pass" if t["pass"] else "**miss**"
        lines.append(f"| {t['check']} | {_fmt(t['ratio'], '.2f')} | {t['target']} | {verdict} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], setups: Sequence[Setup], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, kind in zip(axes, ("json", "sse"), strict=True):
        for i, s in enumerate(setups):
            color = plt.get_cmap("tab20")(i % 20)
            closed = sorted((r for r in rows if r["setup"] == s.name and r["response"] == kind
                             and r["load"] == "closed"), key=lambda r: r["concurrency"])
            opened = [r for r in rows if r["setup"] == s.name and r["response"] == kind and r["load"] == "open"]
            if not closed:
                continue
            style = {"linewidth": 2.5} if s.processor == "epp" else {"linestyle": "--"}
            ax.plot([r["rps"] for r in closed], [r["p50_ms"] for r in closed], marker="o", label=s.name,
                    color=color, **style)
            if opened:
                ax.scatter([r["rps"] for r in opened], [r["p50_ms"] for r in opened], marker="x", color=color)
        ax.set(xlabel="req/s (closed loop c=1, 8, 32: dots; open loop: crosses)", ylabel="p50 latency (ms)",
               yscale="log", title="JSON response" if kind == "json" else "SSE response")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- main ---------------------------------------------------------------------------------------


def _wirings(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(names) - set(WIRINGS))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown wirings {', '.join(unknown) or '(none given)'} "
                                         f"(choose from {', '.join(WIRINGS)})")
    return list(dict.fromkeys(names))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round, 2 s per cell, c=1,8, one open-loop rate")
    p.add_argument("--json", action="store_true", help="one JSON object per cell (medians) on stdout; tables to stderr")
    p.add_argument("--rounds", type=positive_int, default=None, help="interleaved rounds, medians reported (3)")
    p.add_argument("--duration", type=duration, default=None, help="measured seconds per cell (5; 2 with --quick)")
    p.add_argument("--warmup", type=duration, default=None, help="unmeasured wrk seconds per setup start (1)")
    p.add_argument("--concurrency", type=int_list, default=None, help="closed-loop connections (1,8,32; 1,8 quick)")
    p.add_argument("--rates", type=int_list, default=None, help="open-loop req/s (100,300; 100 with --quick)")
    p.add_argument("--sse-chunks", type=positive_int, default=64, help="SSE events per streamed response (64)")
    p.add_argument("--sse-gap-ms", type=float, default=0.0,
                   help="upstream pause between SSE events (0: back to back, so Envoy coalesces some; "
                        "see ext_proc msgs/req)")
    p.add_argument("--responses", default="json,sse", help="json,sse (default both)")
    p.add_argument("--wirings", type=_wirings, default=[w.name for w in WIRINGS.values() if w.default],
                   help=f"ext_proc wirings (default {','.join(w.name for w in WIRINGS.values() if w.default)}; "
                        f"all: {','.join(WIRINGS)})")
    p.add_argument("--no-floors", action="store_true", help="skip the floor processors")
    p.add_argument("--no-router", action="store_true", help="skip the vllm-router peer row")
    p.add_argument("--epp-log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="epp serve's --log-level (info, the product default; debug adds one line per request)")
    p.add_argument("--epp-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for epp serve (repeatable), e.g. --epp-arg=--scheduling-profile=random")
    p.add_argument("--out", type=Path, metavar="PREFIX",
                   help="write PREFIX.json, PREFIX.jsonl and PREFIX.png (default: write nothing)")
    args = p.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.duration = args.duration or (2.0 if q else 5.0)
    args.warmup = args.warmup or 1.0
    args.concurrency = args.concurrency or ([1, 8] if q else [1, 8, 32])
    args.rates = args.rates or ([100] if q else [100, 300])
    args.responses = [x.strip() for x in args.responses.split(",") if x.strip()]
    if not args.responses or set(args.responses) - {"json", "sse"}:
        p.error("--responses: a comma-separated subset of json,sse")
    return args


async def run(args: argparse.Namespace, out: Output) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="e2e-overhead-") as tmp:
        children = Children(Path(tmp))
        bench = Bench(args, out, Path(tmp), children)
        try:
            await bench.prepare()
            why_floors = "" if args.no_floors else await asyncio.to_thread(bench.prepare_floors)
            if why_floors:
                out.say(f"{BENCH}: running without the floor processors: {why_floors}")
            why_router = "skipped (--no-router)"
            if not args.no_router:
                bench.router, why_router = await asyncio.to_thread(find_vllm_router)
                if bench.router is None:
                    out.say(f"{BENCH}: running without the vllm-router row: {why_router}")
            setups = setups_for(args.wirings, not args.no_floors and not why_floors, bench.router is not None)
            loads = [Load("closed", c) for c in args.concurrency] + [Load("open", r) for r in args.rates]
            cells = len(setups) * len(args.responses) * len(loads)
            out.say(f"{len(setups)} setups x {len(args.responses)} responses x {len(loads)} loads = {cells} cells, "
                    f"{args.rounds} round(s), {args.duration:g} s per cell; upstreams {', '.join(bench.endpoints)}; "
                    f"Envoy --concurrency {ENVOY_CONCURRENCY}; open loop: _e2e.py openloop (no wrk2 here)")
            rows: list[dict[str, Any]] = []
            for rnd in range(args.rounds):
                order = setups[rnd % len(setups):] + setups[:rnd % len(setups)]  # rotate: no setup always first
                for setup in order:
                    t0 = time.monotonic()
                    running = await bench.start(setup)
                    try:
                        await bench.warm(running)
                        for kind in args.responses:
                            for load in loads:
                                row = await bench.cell(running, kind, load)
                                row["round"] = rnd + 1
                                rows.append(row)
                    finally:
                        await bench.stop(running)
                    out.say(f"  round {rnd + 1}/{args.rounds} {setup.name:<32} {time.monotonic() - t0:5.1f} s")
        finally:
            await children.aclose()
    order = [s.name for s in setups]
    med = medians(rows, order)
    for row in med:
        out.row({k: v for k, v in row.items() if k != "round"})
    rs = ratios(med, args.wirings)
    ts = targets(rs, med)
    wall = time.monotonic() - started
    out.say(f"\n## all cells (medians of {args.rounds} round(s); {wall:.0f} s wall)\n")
    out.say(cell_table(med))
    out.say("\n## issue 10's view\n")
    out.say(why_table(med, setups))
    out.say("\n## ratios (epp over the floor processors in the same wiring)\n")
    out.say(ratio_table(rs))
    out.say("\n## targets\n")
    out.say(target_table(ts))
    if args.out:
        write_out(args, rows, med, rs, ts, setups, wall, why_floors, why_router, out)
    return 0


def write_out(args: argparse.Namespace, rows: list[dict[str, Any]], med: list[dict[str, Any]],
              rs: list[dict[str, Any]], ts: list[dict[str, Any]], setups: list[Setup], wall: float,
              why_floors: str, why_router: str, out: Output) -> None:
    prefix: Path = args.out
    prefix.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "command": " ".join(["python", "benchmarks/e2e_overhead.py", *sys.argv[1:]]),
        "rounds": args.rounds, "duration_s": args.duration, "sse_chunks": args.sse_chunks,
        "sse_gap_ms": args.sse_gap_ms,
        "envoy_concurrency": ENVOY_CONCURRENCY, "wirings": args.wirings, "epp_log_level": args.epp_log_level,
        "floors": why_floors or "ran", "vllm_router": why_router or "ran", "wall_s": round(wall, 1),
        "medians": med, "rows": rows, "ratios": rs, "targets": ts,
    }
    json_path, jsonl_path, png_path = (prefix.with_name(prefix.name + ext) for ext in (".json", ".jsonl", ".png"))
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    jsonl_path.write_text("".join(json_line(r) + "\n" for r in med))
    title = (f"Envoy 1.40 --concurrency 1, two aiohttp upstreams, wrk -t1; {args.rounds} round(s), "
             f"{args.duration:g} s per cell, SSE {args.sse_chunks} chunks")
    drawn = plot(med, setups, png_path, title)
    out.say(f"\nwrote {json_path}, {jsonl_path}" + (f" and {png_path}" if drawn else " (no matplotlib: no plot)"))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Output(args.json)
    try:
        return uvloop.run(run(args, out))
    except KeyboardInterrupt:
        print(f"{BENCH}: interrupted; every process it started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
