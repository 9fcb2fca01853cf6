"""`epp serve --workers N` under ghz: how throughput scales with worker processes.

    python benchmarks/workers_bench.py [--workers 1,2] [--concurrency 16,64] [--connections 8]
                                       [--rounds 3] [--duration 5s] [--sequence lean-json] [--json]

For each round (the order of the worker counts rotates every round) and each worker count,
a fresh `epp serve --workers N` (plaintext, scraping off, 8 loopback endpoints nothing
listens on, as `ghz/run.sh`) gets a 1 s warm-up, then one ghz run per concurrency with
`--connections K`: K HTTP/2 connections, the concurrency spread evenly over them, as an
Envoy with several connections to epp would (`epp envoy-config
--ext-proc-max-concurrent-streams`). The kernel (SO_REUSEPORT) hands each connection to
one worker, so the split is per connection, not per stream: the `split` column is each
worker's share of the streams it routed (from its own `/metrics`).

Columns (medians over the rounds): streams/s, its ratio to the 1-worker row at the same
concurrency, ghz's p50 and p99 per stream, errors (summed), the CPU per stream of epp (the
parent and every worker: utime + stime from `/proc/<pid>/stat`) and of ghz (`wait4`'s
rusage), and the split. ghz (v0.121.0) is the one `ghz/run.sh` builds into
`~/.cache/epp/ghz/` (built here through `run.sh --build-only` when missing); the message
sequence is `ghz/messages.py`'s, with one fixed request id (`--fixed-request-id`: half of
ghz's own CPU per stream, see README).
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from _cli import ArgumentParser, Output, duration, int_list, positive_int

ROOT = Path(__file__).resolve().parent.parent
CALL = "envoy.service.ext_proc.v3.ExternalProcessor/Process"
ENDPOINTS = [f"127.0.1.{i}:8000" for i in range(1, 9)]
CLK_TCK = os.sysconf("SC_CLK_TCK")
GHZ = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "epp" / "ghz" / "ghz"
KEYS = ("bench", "workers", "concurrency", "connections", "sequence", "rounds", "streams_per_s", "speedup", "p50_ms",
        "p99_ms", "errors", "epp_cpu_us", "ghz_cpu_us", "split")  # fmt: skip


def ghz_binary() -> Path:
    if not GHZ.exists():
        subprocess.run(["bash", str(ROOT / "benchmarks" / "ghz" / "run.sh"), "--build-only"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    return GHZ


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of its live children (the workers), in seconds."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(c) for c in (task / "children").read_text().split()]
    ticks = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(") ", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def routed(port: int) -> float:
    """``inference_model_request_total`` summed, from one worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        lines = page.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("inference_model_request_total{"))


class Epp:
    """``epp serve --workers N`` up to its ready line."""

    def __init__(self, workers: int, work: Path) -> None:
        pool = work / "pool.yaml"
        pool.write_text(f"pool:\n  name: bench\n  endpoints: [{', '.join(ENDPOINTS)}]\n")
        self.log = (work / f"epp-{workers}.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "epp", "serve", "--pool-file", str(pool), "--workers", str(workers),
             "--bind-address", "127.0.0.1", "--grpc-port", "0", "--grpc-health-port", "0", "--metrics-port", "0",
             "--secure-serving=false", "--refresh-metrics-interval", "0", "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=self.log)  # fmt: skip
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"epp --workers {workers}: no ready line (see {self.log.name})")
        self.ready: dict[str, Any] = json.loads(line)
        self.metrics_ports: list[int] = self.ready.get("worker_metrics_ports") or [self.ready["metrics_port"]]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ready['grpc_port']}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_ghz(ghz: Path, epp: Epp, data: Path, concurrency: int, connections: int, seconds: float,
            out: Path) -> dict[str, Any]:  # fmt: skip
    """One ghz run; its report with the CPU of both sides and each worker's share."""
    before_routed = [routed(p) for p in epp.metrics_ports]
    before = cpu_seconds(epp.proc.pid)
    proc = subprocess.Popen(
        [str(ghz), "--insecure", "--call", CALL, "--count-errors", "--duration-stop=wait", "-D", str(data),
         "-c", str(concurrency), "--connections", str(connections), "-z", f"{seconds}s", "-O", "json", "-o", str(out),
         epp.address],
        stdout=subprocess.DEVNULL)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    after = cpu_seconds(epp.proc.pid)
    if proc.returncode != 0:
        raise RuntimeError(f"ghz exited {proc.returncode}")
    report = json.loads(out.read_text())
    shares = [routed(p) - b for p, b in zip(epp.metrics_ports, before_routed, strict=True)]
    count = int(report.get("count") or 0)
    latencies = {e["percentage"]: e["latency"] / 1e6 for e in report.get("latencyDistribution") or []}
    statuses = report.get("statusCodeDistribution") or {}
    total = sum(shares) or 1.0
    return {
        "streams_per_s": float(report.get("rps") or 0.0),
        "p50_ms": latencies.get(50, float("nan")),
        "p99_ms": latencies.get(99, float("nan")),
        "errors": sum(n for s, n in statuses.items() if s != "OK"),
        "epp_cpu_us": (after - before) / count * 1e6 if count else float("nan"),
        "ghz_cpu_us": (usage.ru_utime + usage.ru_stime) / count * 1e6 if count else float("nan"),
        "split": [round(100 * s / total) for s in shares],
    }


def main() -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int_list, default=[1, 2])
    p.add_argument("--concurrency", type=int_list, default=[16, 64])
    p.add_argument("--connections", type=positive_int, default=8, help="ghz --connections (≤ every concurrency)")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--duration", type=duration, default=5.0, metavar="DURATION", help="per ghz run (default 5s)")
    p.add_argument("--sequence", default="lean-json", choices=["lean-json", "buffered-json", "duplex-json"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.connections > min(args.concurrency):
        p.error(f"--connections {args.connections} is more than concurrency {min(args.concurrency)}")
    out = Output(args.json)
    ghz = ghz_binary()
    results: dict[tuple[int, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ghz" / "messages.py"), str(work / "data"),
                        "--fixed-request-id"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        data = work / "data" / f"{args.sequence}.json"
        for r in range(args.rounds):
            order = args.workers[r % len(args.workers) :] + args.workers[: r % len(args.workers)]
            for n in order:
                epp = Epp(n, work)
                try:
                    run_ghz(ghz, epp, data, 16, min(args.connections, 16), 1.0, work / "warmup.json")
                    for c in args.concurrency:
                        res = run_ghz(ghz, epp, data, c, args.connections, args.duration, work / "report.json")
                        results.setdefault((n, c), []).append(res)
                        out.say(f"[workers-bench] round {r + 1}: {n} worker(s), c={c}: {res['streams_per_s']:,.0f} "
                                f"streams/s, split {res['split']}")  # fmt: skip
                finally:
                    epp.stop()
    rows = []
    for (n, c), runs in sorted(results.items()):
        med = {k: statistics.median(x[k] for x in runs) for k in ("streams_per_s", "p50_ms", "p99_ms", "epp_cpu_us",
                                                                   "ghz_cpu_us")}  # fmt: skip
        base = results.get((1, c))
        speedup = med["streams_per_s"] / statistics.median(x["streams_per_s"] for x in base) if base else float("nan")
        splits = sorted((x["split"] for x in runs), key=max)
        rows.append({"bench": "workers_bench", "workers": n, "concurrency": c, "connections": args.connections,
                     "sequence": args.sequence, "rounds": len(runs), **med, "speedup": speedup,
                     "errors": sum(x["errors"] for x in runs), "split": splits[len(splits) // 2]})  # fmt: skip
    for row in rows:
        out.row({k: row[k] for k in KEYS})
    out.say(f"\n{args.sequence}, {args.connections} connections, {args.rounds} rounds of {args.duration:g} s, "
            f"medians; {os.cpu_count()} cores\n")  # fmt: skip
    out.say("| workers | concurrency | streams/s | vs 1 worker | p50 ms | p99 ms | errors | epp CPU µs/stream "
            "| ghz CPU µs/stream | split % (median run) |")  # fmt: skip
    out.say("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        out.say(f"| {r['workers']} | {r['concurrency']} | {r['streams_per_s']:,.0f} | {r['speedup']:.2f} "
                f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | {r['epp_cpu_us']:,.0f} "
                f"| {r['ghz_cpu_us']:,.0f} | {'/'.join(map(str, r['split']))} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
