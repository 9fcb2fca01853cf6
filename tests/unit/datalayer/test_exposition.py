"""The exposition reader (``epp/datalayer/exposition.py``) against prometheus_client's own parser,
over recorded and generated pages of every engine."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp.datalayer.engines import ENGINES
from epp.datalayer.exposition import ExpositionError, extract, parse_metrics
from epp_sim.vllm_page import vllm_exposition

from support import DATA

SAMPLES = {
    "vllm-0.33-full": (vllm_exposition(), "vllm"),
    "vllm-0.33-two-engines": (vllm_exposition(engines=2), "vllm"),
    "vllm-0.33-short": ((DATA / "vllm-0.33-short.txt").read_text(), "vllm"),
    "vllm-legacy": ((DATA / "vllm-legacy.txt").read_text(), "vllm"),
    "vllm-legacy-generated": (vllm_exposition(legacy=True), "vllm"),
    "sglang": ((DATA / "sglang.txt").read_text(), "sglang"),
    "trtllm-serve": ((DATA / "trtllm.txt").read_text(), "trtllm-serve"),
    "triton": ((DATA / "triton.txt").read_text(), "triton-tensorrt-llm"),
}


def reference_samples(text: str, names: set[str]) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in names:
                out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


@pytest.mark.parametrize("sample", list(SAMPLES), ids=list(SAMPLES))
def test_extract_matches_prometheus_client(sample):
    text, engine = SAMPLES[sample]
    every = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for names in (set(ENGINES[engine].families()), every):  # the families epp needs, and everything
        expected = reference_samples(text, names)
        assert expected  # the page has them: equal empty results would prove nothing
        assert extract(text, names) == expected


def test_full_vllm_page():
    m = parse_metrics(vllm_exposition(), ENGINES["vllm"], now=5.0)
    assert (m.running, m.waiting, m.kv_usage, m.updated_at) == (12, 3, pytest.approx(0.4137), 5.0)
    # the lora series with the largest value (newest timestamp) wins
    assert m.active_adapters == {"sql-lora", "tweet-summary"} and m.waiting_adapters == {"sql-lora-1"}
    assert (m.max_lora, m.block_size, m.num_blocks) == (4, 16, 27793)


def test_data_parallel_page_reads_the_first_engine():
    m = parse_metrics(vllm_exposition(engines=2), ENGINES["vllm"], now=0)
    assert (m.running, m.waiting) == (12, 3)


def test_legacy_vllm_uses_gpu_cache_usage():
    m = parse_metrics((DATA / "vllm-legacy.txt").read_text(), ENGINES["vllm"], now=0)
    assert (m.running, m.waiting, m.kv_usage) == (4, 7, pytest.approx(0.8821))
    assert m.active_adapters == {"tweet-summary"} and m.waiting_adapters == {"sql-lora"} and m.max_lora == 2
    assert (m.block_size, m.num_blocks) == (16, 7892)


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        ("sglang", (9, 2, 0.27, 1, 412345)),
        ("trtllm-serve", (31, 5, 0.55, 32, 9000)),
        ("triton", (6, 4, 0.25, 64, 4000)),
    ],
)
def test_other_engines(sample, expected):
    text, engine = SAMPLES[sample]
    m = parse_metrics(text, ENGINES[engine], now=0)
    assert (m.running, m.waiting, m.kv_usage, m.block_size, m.num_blocks) == pytest.approx(expected)


def test_tricky_lines_match_prometheus_client():
    text = (
        '# TYPE x gauge\n'
        'x{a="q\\"uote",b="brace}",c="back\\\\slash",d="new\\nline"} 1.5 1700000000000\n'
        'x{a="",b="nan"} NaN\n'
        'x{a="inf"} +Inf\n'
        'x 7\n'
        'x_other 3\n'
    )
    got = extract(text, {"x"})
    ref = reference_samples(text, {"x"})["x"]
    assert len(got["x"]) == len(ref) == 4
    for (gl, gv), (rl, rv) in zip(got["x"], ref, strict=True):
        assert gl == rl and (gv == rv or (math.isnan(gv) and math.isnan(rv)))


@pytest.mark.parametrize(
    "text",
    [
        "vllm:num_requests_running{engine=\"0\" 3\n",  # unterminated labels
        "vllm:num_requests_running{engine=0} 3\n",  # unquoted value
        "vllm:num_requests_running{engine=\"0\"}\n",  # no value
        "vllm:num_requests_running{engine=\"0\"} three\n",
    ],
)
def test_garbage_raises_exposition_error(text):
    with pytest.raises(ExpositionError):
        extract(text, {"vllm:num_requests_running"})


def test_missing_core_gauge_is_an_error_and_nan_kv_is_worst():
    with pytest.raises(ExpositionError, match="kv_cache_usage_perc"):
        parse_metrics("vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n", ENGINES["vllm"], now=0)
    m = parse_metrics(
        "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc NaN\n", ENGINES["vllm"], 0
    )
    assert m.kv_usage == 1.0


def test_lora_series_tied_on_whole_second_timestamps_are_united():
    text = (
        'vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0.1\n'
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.795633896e+09\n'
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="tweet-summary",waiting_lora_adapters=""} '
        '1.7956339e+09\n'
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="tweet-summary,sql-lora",'
        'waiting_lora_adapters="sql-lora"} 1.7956339e+09\n'
    )
    m = parse_metrics(text, ENGINES["vllm"], now=0)
    assert m.active_adapters == {"tweet-summary", "sql-lora"} and m.waiting_adapters == {"sql-lora"}
