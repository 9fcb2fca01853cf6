"""Summarise ghz reports: one row per (setup, sequence, concurrency), a table and ``--json`` lines.

    python benchmarks/ghz/summarise.py [--json] [--out-dir DIR] REPORT.json...

Each REPORT is ghz's ``-O json`` output of one run; ``run.sh`` tags it
(``--tags '{"setup": …, "sequence": …}'``) so the row knows what it measured.  With
``--out-dir`` a copy of each report without its per-call ``details`` (the bulk of the file;
the latency distribution and histogram stay) is written there as
``<setup>_<sequence>_c<concurrency>.json``.  A file ``REPORT.cpu`` beside a report (written by
``run.sh``: ``{"proc_cpu_s": …, "ghz_cpu_s": …}``, the CPU seconds the processor and ghz used
during the run) gives ``proc_cpu_us`` and ``ghz_cpu_us``, CPU per stream; it is kept in the
saved copy under ``"cpu"``.

The rules of benchmarks/README.md: with ``--json`` stdout carries exactly one JSON object
per row and the table goes to stderr; without it the table goes to stdout.  ``p50_ms`` and
``p99_ms`` are ghz's own percentiles over every counted call (``--count-errors``: failed
streams too); ``errors`` is every call whose status was not OK.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

NS_PER_MS = 1e6
KEYS = ("bench", "setup", "sequence", "concurrency", "streams_per_s", "p50_ms", "p99_ms", "errors", "count",
        "duration_s", "messages_per_stream", "proc_cpu_us", "ghz_cpu_us")  # fmt: skip


def _percentile(report: dict[str, Any], pct: int) -> float:
    for entry in report.get("latencyDistribution") or []:
        if entry.get("percentage") == pct:
            return float(entry["latency"]) / NS_PER_MS
    return math.nan


def _per_stream_us(cpu: dict[str, Any], key: str, count: int) -> float:
    seconds = cpu.get(key)
    return float(seconds) / count * 1e6 if isinstance(seconds, (int, float)) and count else math.nan


def row(report: dict[str, Any], cpu: dict[str, Any] | None = None) -> dict[str, Any]:
    cpu = cpu or {}
    count = int(report.get("count") or 0)
    tags = report.get("tags") or {}
    options = report.get("options") or {}
    statuses = report.get("statusCodeDistribution") or {}
    data = options.get("data")
    return {
        "bench": "ghz",
        "setup": tags.get("setup", "?"),
        "sequence": tags.get("sequence", "?"),
        "concurrency": int(options.get("concurrency") or 0),
        "streams_per_s": float(report.get("rps") or 0.0),
        "p50_ms": _percentile(report, 50),
        "p99_ms": _percentile(report, 99),
        "errors": sum(n for status, n in statuses.items() if status != "OK"),
        "count": count,
        "duration_s": float(report.get("total") or 0) / 1e9,
        "messages_per_stream": len(data) if isinstance(data, list) else 0,
        "proc_cpu_us": _per_stream_us(cpu, "proc_cpu_s", count),
        "ghz_cpu_us": _per_stream_us(cpu, "ghz_cpu_s", count),
    }


def _num(value: float, digits: int) -> str:
    return "—" if not math.isfinite(value) else f"{value:,.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setup | sequence | messages | concurrency | streams/s | p50 ms | p99 ms | errors "
        "| proc CPU µs/stream | ghz CPU µs/stream |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['sequence']} | {r['messages_per_stream']} | {r['concurrency']} "
            f"| {_num(r['streams_per_s'], 0)} | {_num(r['p50_ms'], 2)} | {_num(r['p99_ms'], 2)} | {r['errors']} "
            f"| {_num(r['proc_cpu_us'], 0)} | {_num(r['ghz_cpu_us'], 0)} |"
        )
    return "\n".join(lines)


def _json_line(r: dict[str, Any]) -> str:
    clean = {k: (None if isinstance(r[k], float) and not math.isfinite(r[k]) else r[k]) for k in KEYS}
    return json.dumps(clean)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="summarise ghz JSON reports")
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--json", action="store_true", help="one JSON object per row on stdout; table on stderr")
    parser.add_argument("--out-dir", type=Path, help="write each report here, without per-call details")
    args = parser.parse_args(argv)
    rows = []
    for path in args.reports:
        report = json.loads(path.read_text())
        cpu_file = path.with_name(path.name + ".cpu")
        cpu = json.loads(cpu_file.read_text()) if cpu_file.exists() else {}
        r = row(report, cpu)
        rows.append(r)
        if args.out_dir is not None:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            report.pop("details", None)
            report["cpu"] = cpu
            name = f"{r['setup']}_{r['sequence']}_c{r['concurrency']}.json"
            (args.out_dir / name).write_text(json.dumps(report, indent=1) + "\n")
    human = sys.stderr if args.json else sys.stdout
    if args.json:
        for r in rows:
            print(_json_line(r), flush=True)
    print(table(rows), file=human, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
