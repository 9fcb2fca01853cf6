"""Where a routed request's CPU goes: epp's own Python against the transport both floors pay.

    python benchmarks/hotpath_profile.py [--sequences lean-json,duplex-json,duplex-sse] [--rounds 5]
                                         [--requests 4000] [--perf] [--perf-seconds 5] [--json]

**In process** (always): the ext_proc servicers are driven directly, without gRPC, on the
message sequences `ghz/messages.py` writes: each message is parsed from its bytes (as the
transport hands it over) and each reply serialised.  Rows per sequence, µs per request
(median of `--rounds`):

- `floor-py`: the Python floor's servicer (`baselines/floor_py.py`): what any Python
  picker pays above the transport;
- `epp`: `epp serve`'s servicer (the App as `ghz/run.sh` starts it: 8 endpoints, scraping
  off, the epp-default profile);
- `epp, scheduler stubbed`: the same with `Scheduler.schedule` returning the first
  candidate, and `epp, router stubbed` with `Router.route` returning a fixed pick.

The differences are the split, each the median of its per-round differences (the variants
of a round run back to back): scheduler = epp - (scheduler stubbed); routing glue (model
policy, candidates, admission, the decision's timing, the mirror pick) = (scheduler stubbed)
- (router stubbed); the stream's own work (headers, body parsing, replies, accounting,
metrics) = (router stubbed) - floor-py.

**Under ghz, with perf** (`--perf`): `epp serve` and `floor_py.py` as processes under ghz
(lean-json, 64 streams, one connection, as `ghz/run.sh`), each sampled by `perf record -g`
(999 Hz) for `--perf-seconds`; the table gives each one's CPU per stream and the share of
its samples in each shared object: the Python interpreter (`python3.11`/`libpython`), grpc's
Cython extension (`cygrpc`: grpc core and its glue), the kernel, libc, uvloop, protobuf's
upb, and the rest.  The interpreter's share is where epp's own Python shows.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from _cli import ArgumentParser, Output, positive_float, positive_int
from workers_bench import ENDPOINTS, Epp, cpu_seconds, ghz_binary, run_ghz

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks" / "ghz"), str(ROOT / "benchmarks" / "baselines")]

import floor_py  # noqa: E402
import messages  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from protoset import write_protoset  # noqa: E402

from epp.app import App  # noqa: E402
from epp.config import Settings  # noqa: E402
from epp.domain import Pick  # noqa: E402

SEQUENCES = ("lean-json", "duplex-json", "duplex-sse")
VARIANTS = ("floor-py", "epp", "epp, scheduler stubbed", "epp, router stubbed")
DSO_GROUPS = (  # (label, pattern on the shared object's name), first match wins
    ("interpreter", re.compile(r"python3|libpython")),
    ("grpc (cygrpc)", re.compile(r"cygrpc")),
    ("kernel", re.compile(r"kernel")),
    ("libc", re.compile(r"libc[.-]|libc\.so|ld-linux|libm\.")),
    ("uvloop", re.compile(r"uvloop|loop\.cpython")),
    ("protobuf (upb)", re.compile(r"_message|upb|protobuf")),
)


class _Context:
    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"abort {code}: {details}")


async def _messages(wire: list[bytes]) -> AsyncIterator[Any]:
    for data in wire:
        yield pb.ProcessingRequest.FromString(data)


async def _per_request_us(servicer: Any, wire: list[bytes], n: int) -> float:
    context = _Context()
    start = time.perf_counter()
    for _ in range(n):
        async for reply in servicer.Process(_messages(wire), context):
            reply.SerializeToString()
    return (time.perf_counter() - start) / n * 1e6


def _epp_app(work: Path) -> App:
    pool = work / "pool.yaml"
    pool.write_text(f"pool:\n  name: bench\n  endpoints: [{', '.join(ENDPOINTS)}]\n")
    return App(Settings(pool_file=str(pool), refresh_metrics_interval=0), registry=CollectorRegistry())


def _stub(app: App, variant: str) -> Callable[[], None]:
    """Stub a part of the app for ``variant``; returns the undo."""
    router, scheduler = app.router, app.router._scheduler
    if variant == "epp, scheduler stubbed":
        scheduler.schedule = lambda request, candidates: [candidates[0]]  # type: ignore[method-assign]
        return lambda: delattr(scheduler, "schedule")
    if variant == "epp, router stubbed":
        pick = Pick(endpoints=(app.datastore.endpoints()[0],), target_model=messages.MODEL, mirror=None)
        router.route = lambda request: pick  # type: ignore[method-assign]
        return lambda: delattr(router, "route")
    return lambda: None


SPLIT = (("scheduler_us", "epp", "epp, scheduler stubbed"), ("routing_us", "epp, scheduler stubbed",
         "epp, router stubbed"), ("stream_us", "epp, router stubbed", "floor-py"))  # fmt: skip


async def in_process(sequences: list[str], rounds: int, n: int, work: Path) -> dict[tuple[str, str], float]:
    app = _epp_app(work)
    assert app.discovery is not None
    await app.discovery.sync()
    floor = floor_py.FloorServicer(ENDPOINTS)
    medians: dict[tuple[str, str], float] = {}
    for sequence in sequences:
        docs = messages.sequence(sequence, 64, fixed_request_id=True)
        wire = [json_format.ParseDict(doc, pb.ProcessingRequest()).SerializeToString() for doc in docs]
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(rounds + 1):  # round 0 warms up
            for variant in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:
                undo = _stub(app, variant)
                try:
                    us = await _per_request_us(floor if variant == "floor-py" else app.servicer, wire, n)
                finally:
                    undo()
                if r:
                    samples[variant].append(us)
        for variant, values in samples.items():
            medians[(sequence, variant)] = statistics.median(values)
        for key, minuend, subtrahend in SPLIT:
            pairs = zip(samples[minuend], samples[subtrahend], strict=True)
            medians[(sequence, key)] = statistics.median(a - b for a, b in pairs)
    if app.datastore.load.total_inflight():
        raise RuntimeError("requests left in flight after the in-process runs")
    return medians


class FloorPy:
    """``baselines/floor_py.py`` as a process, up to its ready line (the shape of ``workers_bench.Epp``)."""

    def __init__(self, work: Path) -> None:
        self.log = (work / "floor-py.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "baselines" / "floor_py.py"), "--address", "127.0.0.1:0",
             "--endpoints", ",".join(ENDPOINTS)], stdout=subprocess.PIPE, stderr=self.log)  # fmt: skip
        assert self.proc.stdout is not None
        self.ready = json.loads(self.proc.stdout.readline() or b"{}")
        if "port" not in self.ready:
            self.stop()
            raise RuntimeError(f"floor_py.py: no ready line (see {self.log.name})")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ready['port']}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


def _dso_shares(report: str) -> dict[str, float]:
    """``perf report --sort dso`` percentages, grouped by DSO_GROUPS (the rest as "other")."""
    shares: dict[str, float] = {}
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S.*)$", line)
        if not m or line.lstrip().startswith("#"):
            continue
        pct, dso = float(m.group(1)), m.group(2).strip()
        label = next((name for name, pattern in DSO_GROUPS if pattern.search(dso)), "other")
        shares[label] = shares.get(label, 0.0) + pct
    return shares


def under_perf(seconds: float, work: Path) -> Iterator[dict[str, Any]]:
    perf = shutil.which("perf")
    if perf is None:
        raise RuntimeError("--perf needs perf (apt-get install linux-perf)")
    ghz = ghz_binary()
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ghz" / "messages.py"), str(work / "data"),
                    "--fixed-request-id"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    data = work / "data" / "lean-json.json"
    for setup in ("floor-py", "epp"):
        proc: Any = FloorPy(work) if setup == "floor-py" else Epp(1, work)
        try:
            warm = work / "warmup.json"
            _run(ghz, proc, data, 16, 1.0, warm, work)
            sampled = work / f"{setup}.perf.data"
            record = [perf, "record", "-q", "-F", "999", "-g", "-o", str(sampled), "-p", str(proc.proc.pid)]
            recorder = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                res = _run(ghz, proc, data, 64, seconds, work / "report.json", work)
            finally:
                recorder.send_signal(2)
                recorder.wait(60)
            report = subprocess.run([perf, "report", "-i", str(sampled), "--no-children", "--sort", "dso", "--stdio"],
                                    capture_output=True, text=True, check=True).stdout  # fmt: skip
            yield {"setup": setup, **res, "dso_shares": _dso_shares(report)}
        finally:
            proc.stop()


def _run(ghz: Path, proc: Any, data: Path, concurrency: int, seconds: float, out: Path, work: Path) -> dict[str, Any]:
    if isinstance(proc, Epp):
        return run_ghz(ghz, proc, data, concurrency, 1, seconds, out)
    # the floor: as run_ghz, with a protoset (no reflection) and no /metrics to read
    before = cpu_seconds(proc.proc.pid)
    subprocess.run(
        [str(ghz), "--insecure", "--protoset", str(write_protoset(work / "extproc.protoset")), "--call",
         "envoy.service.ext_proc.v3.ExternalProcessor/Process", "--count-errors", "--duration-stop=wait", "-D",
         str(data), "-c", str(concurrency), "-z", f"{seconds}s", "-O", "json", "-o", str(out), proc.address],
        stdout=subprocess.DEVNULL, check=True)  # fmt: skip
    after = cpu_seconds(proc.proc.pid)
    report = json.loads(out.read_text())
    count = int(report.get("count") or 0)
    return {"streams_per_s": float(report.get("rps") or 0.0),
            "epp_cpu_us": (after - before) / count * 1e6 if count else float("nan")}  # fmt: skip


def main() -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", default=",".join(SEQUENCES), help=f"comma-separated, of {', '.join(SEQUENCES)}")
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--requests", type=positive_int, default=4000, help="requests per round and row")
    p.add_argument("--perf", action="store_true", help="also sample epp and floor-py under ghz with perf")
    p.add_argument("--perf-seconds", type=positive_float, default=5.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sequences = [s.strip() for s in args.sequences.split(",") if s.strip()]
    for s in sequences:
        if s not in SEQUENCES:
            p.error(f"unknown sequence {s!r} (expected {', '.join(SEQUENCES)})")
    out = Output(args.json)
    with tempfile.TemporaryDirectory(prefix="hotpath-") as tmp:
        work = Path(tmp)
        medians = asyncio.run(in_process(sequences, args.rounds, args.requests, work))
        out.say(f"\nIn process: µs per request, medians of {args.rounds} rounds of {args.requests}; "
                f"{os.cpu_count()} cores\n")  # fmt: skip
        out.say("| sequence | floor-py | epp | epp, scheduler stubbed | epp, router stubbed "
                "| scheduler | routing glue | stream's own work | epp / floor-py |")  # fmt: skip
        out.say("|---|---|---|---|---|---|---|---|---|")
        for s in sequences:
            floor, epp, no_sched, no_route = (medians[(s, v)] for v in VARIANTS)
            split = {key: medians[(s, key)] for key, _, _ in SPLIT}
            out.row({"bench": "hotpath_in_process", "sequence": s, "floor_py_us": floor, "epp_us": epp,
                     "epp_no_scheduler_us": no_sched, "epp_no_router_us": no_route, **split})  # fmt: skip
            out.say(f"| {s} | {floor:.1f} | {epp:.1f} | {no_sched:.1f} | {no_route:.1f} | {split['scheduler_us']:.1f} "
                    f"| {split['routing_us']:.1f} | {split['stream_us']:.1f} | {epp / floor:.2f} |")  # fmt: skip
        if args.perf:
            rows = list(under_perf(args.perf_seconds, work))
            groups = [name for name, _ in DSO_GROUPS] + ["other"]
            out.say(f"\nUnder ghz (lean-json, 64 streams, {args.perf_seconds:g} s), perf samples by shared object\n")
            out.say("| setup | streams/s | CPU µs/stream | " + " | ".join(groups) + " |")
            out.say("|---|---|---|" + "---|" * len(groups))
            for r in rows:
                shares = r["dso_shares"]
                out.row({"bench": "hotpath_perf", "setup": r["setup"], "streams_per_s": r["streams_per_s"],
                         "cpu_us": r["epp_cpu_us"], **{f"share_{g}": shares.get(g, 0.0) for g in groups}})  # fmt: skip
                out.say(f"| {r['setup']} | {r['streams_per_s']:,.0f} | {r['epp_cpu_us']:,.0f} | "
                        + " | ".join(f"{shares.get(g, 0.0):.1f} %" for g in groups) + " |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
