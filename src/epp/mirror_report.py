"""Primary vs shadow, side by side, from the model servers' own /metrics.

Reads vLLM metrics of every pod of both pools at the start and end of a window and
reports, per pool: requests finished, errors, TTFT p50/p90, inter-token latency p50,
output tokens/s.  Quantiles are interpolated within histogram buckets (as PromQL's
``histogram_quantile`` does) on the window's bucket deltas, summed across pods.
Works against real vLLM pods as well as ``epp-sim``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

# prometheus_client's ``name[]`` filter matches sample names, not family names
SAMPLE_NAMES = (
    "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:generation_tokens_total",
)
ERROR_REASONS = frozenset({"error", "abort"})


@dataclass
class PodSnapshot:
    """Cumulative counters of one pod at one instant."""

    finished: float = 0.0
    errors: float = 0.0
    output_tokens: float = 0.0
    ttft: dict[float, float] = field(default_factory=dict)  # upper bound → cumulative count
    itl: dict[float, float] = field(default_factory=dict)


def parse_pod(text: str) -> PodSnapshot:
    snap = PodSnapshot()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:request_success_total":
                snap.finished += s.value
                # vLLM labels it finished_reason; llm-d-inference-sim finish_reason
                reason = s.labels.get("finished_reason", s.labels.get("finish_reason"))
                if reason in ERROR_REASONS:
                    snap.errors += s.value
            elif s.name == "vllm:generation_tokens_total":
                snap.output_tokens += s.value
            elif s.name == "vllm:time_to_first_token_seconds_bucket":
                le = float(s.labels["le"])
                snap.ttft[le] = snap.ttft.get(le, 0.0) + s.value
            elif s.name == "vllm:inter_token_latency_seconds_bucket":
                le = float(s.labels["le"])
                snap.itl[le] = snap.itl.get(le, 0.0) + s.value
    return snap


def _delta(after: Mapping[float, float], before: Mapping[float, float]) -> dict[float, float]:
    return {le: v - before.get(le, 0.0) for le, v in after.items()}


def _sum(buckets: Iterable[Mapping[float, float]]) -> dict[float, float]:
    out: dict[float, float] = {}
    for b in buckets:
        for le, v in b.items():
            out[le] = out.get(le, 0.0) + v
    return out


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Quantile from cumulative bucket counts, linear within a bucket; None when empty."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return prev_bound  # in the +Inf bucket: report the highest finite bound
            width = count - prev_count
            return prev_bound + (b - prev_bound) * ((rank - prev_count) / width if width > 0 else 1.0)
        prev_bound, prev_count = b, count
    return prev_bound


@dataclass(frozen=True)
class PoolReport:
    name: str
    pods: int
    requests: int
    errors: int
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    itl_p50_s: float | None
    output_tokens_per_s: float
    per_pod_requests: tuple[int, ...]


def pool_report(name: str, before: Sequence[PodSnapshot], after: Sequence[PodSnapshot], seconds: float) -> PoolReport:
    ttft = _sum(_delta(a.ttft, b.ttft) for a, b in zip(after, before, strict=True))
    itl = _sum(_delta(a.itl, b.itl) for a, b in zip(after, before, strict=True))
    per_pod = tuple(round(a.finished - b.finished) for a, b in zip(after, before, strict=True))
    tokens = sum(a.output_tokens - b.output_tokens for a, b in zip(after, before, strict=True))
    return PoolReport(
        name=name,
        pods=len(after),
        requests=sum(per_pod),
        errors=round(sum(a.errors - b.errors for a, b in zip(after, before, strict=True))),
        ttft_p50_s=histogram_quantile(0.5, ttft),
        ttft_p90_s=histogram_quantile(0.9, ttft),
        itl_p50_s=histogram_quantile(0.5, itl),
        output_tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        per_pod_requests=per_pod,
    )


async def snapshot(session: aiohttp.ClientSession, urls: Sequence[str]) -> list[PodSnapshot]:
    """Scrape every pod concurrently (only the families the report needs)."""
    params = [("name[]", n) for n in SAMPLE_NAMES]

    async def one(url: str) -> PodSnapshot:
        async with session.get(url.rstrip("/") + "/metrics", params=params) as r:
            r.raise_for_status()
            return parse_pod(await r.text())

    return list(await asyncio.gather(*(one(u) for u in urls)))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms"


def render_table(reports: Sequence[PoolReport]) -> str:
    rows = [
        ("", *(r.name for r in reports)),
        ("pods", *(str(r.pods) for r in reports)),
        ("requests", *(str(r.requests) for r in reports)),
        ("  per pod", *(" / ".join(map(str, r.per_pod_requests)) for r in reports)),
        ("errors", *(str(r.errors) for r in reports)),
        ("TTFT p50", *(_ms(r.ttft_p50_s) for r in reports)),
        ("TTFT p90", *(_ms(r.ttft_p90_s) for r in reports)),
        ("inter-token p50", *(_ms(r.itl_p50_s) for r in reports)),
        ("output tokens/s", *(f"{r.output_tokens_per_s:.0f}" for r in reports)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )


def to_json(reports: Sequence[PoolReport]) -> str:
    return orjson.dumps([r.__dict__ for r in reports]).decode()


async def run_report(primary: Sequence[str], shadow: Sequence[str], seconds: float) -> list[PoolReport]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        before = await asyncio.gather(snapshot(session, primary), snapshot(session, shadow))
        await asyncio.sleep(seconds)
        after = await asyncio.gather(snapshot(session, primary), snapshot(session, shadow))
        elapsed = loop.time() - t0
    return [pool_report("primary", before[0], after[0], elapsed), pool_report("shadow", before[1], after[1], elapsed)]
