"""The mirror report (``epp/mirror_report.py``): a pod's /metrics, histogram quantiles, pool deltas, the table."""

from __future__ import annotations

import math

import pytest

from epp.mirror_report import PodSnapshot, histogram_quantile, parse_pod, pool_report, render_table

TEXT = """
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 8.0
vllm:request_success_total{engine="0",finished_reason="error",model_name="m"} 2.0
vllm:generation_tokens_total{engine="0",model_name="m"} 500.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.2",model_name="m"} 8.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="m"} 100.0
vllm:inter_token_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 100.0
"""


def test_parse_pod():
    s = parse_pod(TEXT)
    assert (s.finished, s.errors, s.output_tokens) == (10, 2, 500)
    assert s.ttft == {0.1: 4, 0.2: 8, math.inf: 10}


@pytest.mark.parametrize(
    ("q", "expected"), [(0.2, 0.05), (0.4, 0.1), (0.6, 0.15), (0.8, 0.2), (0.95, 0.2)],
)
def test_quantile_interpolates_within_buckets(q, expected):
    assert histogram_quantile(q, {0.1: 4, 0.2: 8, math.inf: 10}) == pytest.approx(expected)


def test_quantile_of_nothing_is_none():
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {0.1: 0, math.inf: 0}) is None


def test_pool_report_uses_window_deltas_across_pods():
    before = [PodSnapshot(finished=5, output_tokens=100, ttft={0.1: 5, math.inf: 5}), PodSnapshot()]
    after = [PodSnapshot(finished=9, errors=1, output_tokens=300, ttft={0.1: 5, math.inf: 9}),
             PodSnapshot(finished=3, output_tokens=100, ttft={0.1: 3, math.inf: 3})]
    r = pool_report("p", before, after, seconds=2.0)
    assert (r.requests, r.errors, r.per_pod_requests, r.output_tokens_per_s) == (7, 1, (4, 3), 150.0)
    assert r.ttft_p50_s == pytest.approx(0.1)  # 3 fast of 7 in the window: median falls at the 0.1 bound
    table = render_table([r])
    assert "requests" in table and "4 / 3" in table
