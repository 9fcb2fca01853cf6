"""Unit tests of the simulator's vLLM exposition: names, labels, `name[]` filtering, legacy form."""

from __future__ import annotations

import gzip

import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp_sim.domain import EngineConfig, EngineState, SimRequest
from epp_sim.engine import Engine
from epp_sim.metrics import MetricsOverride, PodMetrics
from epp_sim.profiles import FAST
from epp_sim.tokenizer import tokenize

CFG = EngineConfig(profile=FAST, num_gpu_blocks=1000, max_loras=4)
MODEL = "/model/llama2"


def families(pm: PodMetrics, names: list[str] | None = None) -> dict[str, list[tuple[dict[str, str], float]]]:
    body, headers = pm.render(names or [], "", "")
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def run_some_traffic(pm: PodMetrics) -> Engine:
    engine = Engine(CFG)
    for i in range(3):
        prompt = tokenize(f"{i} " + "z" * 400, 16, "sql-lora" if i else None)
        engine.add_request(SimRequest(str(i), prompt, 5, 0.0, "sql-lora" if i else None))
    t = engine.next_event_time()
    while t is not None:
        for out in engine.advance(t):
            c = engine.counters
            pm.observe_step(out, c.preemptions, c.prefix_queries, c.prefix_hits)
        pm.update(engine.state())
        t = engine.next_event_time()
    return engine


def test_vllm_033_families_and_labels() -> None:
    pm = PodMetrics(MODEL, CFG, wall_clock=lambda: 1234.5)
    run_some_traffic(pm)
    fams = families(pm)
    common = {"engine": "0", "model_name": MODEL}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert fams[name][0][0] == common, name
    assert fams["vllm:generation_tokens_total"][0][1] == 15
    assert fams["vllm:time_to_first_token_seconds_count"][0][1] == 3
    assert fams["vllm:inter_token_latency_seconds_count"][0][1] == 12
    success = {lbl["finished_reason"]: v for lbl, v in fams["vllm:request_success_total"]}
    assert success["length"] == 3 and success["stop"] == 0
    cache = fams["vllm:cache_config_info"][0]
    assert cache[0]["block_size"] == "16" and cache[0]["num_gpu_blocks"] == "1000" and cache[1] == 1.0
    lora = fams["vllm:lora_requests_info"]
    assert all(set(lbl) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"} for lbl, _ in lora)
    assert {lbl["running_lora_adapters"] for lbl, _ in lora} >= {"sql-lora", ""}
    assert all(v == 1234.5 for _, v in lora)
    assert "vllm:gpu_cache_usage_perc" not in fams


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (["vllm:num_requests_waiting"], {"vllm:num_requests_waiting"}),
        (["vllm:num_preemptions_total"], {"vllm:num_preemptions_total"}),
        (["vllm:num_preemptions"], set()),  # counters match only with the _total suffix
        (["vllm:time_to_first_token_seconds"], set()),  # histograms only by sample name
        (
            ["vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_count"],
            {"vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_count"},
        ),
        (
            ["vllm:lora_requests_info", "vllm:cache_config_info", "vllm:kv_cache_usage_perc"],
            {"vllm:lora_requests_info", "vllm:cache_config_info", "vllm:kv_cache_usage_perc"},
        ),
    ],
    ids=["gauge", "counter-total", "counter-bare", "histogram-bare", "histogram-samples", "epp-set"],
)
def test_name_filter(query: list[str], expected: set[str]) -> None:
    pm = PodMetrics(MODEL, CFG)
    run_some_traffic(pm)
    assert set(families(pm, query)) == expected


def test_legacy_format() -> None:
    pm = PodMetrics(MODEL, CFG, metrics_format="vllm-legacy")
    run_some_traffic(pm)
    fams = families(pm)
    assert fams["vllm:gpu_cache_usage_perc"][0][0] == {"model_name": MODEL}
    assert "vllm:kv_cache_usage_perc" not in fams and "vllm:prefix_cache_queries_total" not in fams
    assert "vllm:gpu_prefix_cache_hits_total" in fams
    assert "vllm:time_per_output_token_seconds_count" in fams
    assert "engine" not in fams["vllm:cache_config_info"][0][0]


def test_override_gzip_and_lora_series_cap() -> None:
    pm = PodMetrics(MODEL, CFG)
    state = EngineState(waiting=0, running=0, deferred=0, kv_usage=0.1, running_adapters=(), waiting_adapters=())
    pm.set_override(MetricsOverride(waiting=7, kv_usage=0.5, running_adapters=("a", "b")))
    pm.update(state)
    fams = families(pm, ["vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"])
    assert fams["vllm:num_requests_waiting"][0][1] == 7
    assert fams["vllm:kv_cache_usage_perc"][0][1] == 0.5
    assert fams["vllm:lora_requests_info"][0][0]["running_lora_adapters"] == "a,b"
    for i in range(100):
        pm.set_override(MetricsOverride(running_adapters=(f"x{i}",)))
        pm.update(state)
    assert len(families(pm, ["vllm:lora_requests_info"])["vllm:lora_requests_info"]) == 32
    body, headers = pm.render([], "", "gzip, deflate")
    assert headers["Content-Encoding"] == "gzip" and b"vllm:num_requests_running" in gzip.decompress(body)


def test_openmetrics_negotiation() -> None:
    pm = PodMetrics(MODEL, CFG)
    body, headers = pm.render([], "application/openmetrics-text; version=1.0.0", "")
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
