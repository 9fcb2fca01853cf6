"""A full-size vLLM 0.33-style /metrics page, produced by prometheus_client itself.

A fixed reference page for parser tests and scrape benchmarks (the simulator's own pages
come from ``epp_sim.metrics``).  Families, labels and bucket boundaries follow vLLM
0.33's metric list; values are arbitrary but fixed.  About 40 KB for one
engine, like a real page with its histograms.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
        80.0, 160.0, 640.0, 2560.0)
ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
           960.0, 1920.0, 7680.0)
TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 131072)
ITERATION = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def vllm_exposition(*, running: int = 12, waiting: int = 3, kv: float = 0.4137, engines: int = 1,
                    legacy: bool = False) -> str:
    r = CollectorRegistry()
    base = ["model_name", "engine"]
    g_run = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", base, registry=r)
    g_wait = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", base, registry=r)
    kv_name = "vllm:gpu_cache_usage_perc" if legacy else "vllm:kv_cache_usage_perc"
    g_kv = Gauge(kv_name, "KV-cache usage. 1 means 100 percent usage.", base, registry=r)
    by_reason = Gauge("vllm:num_requests_waiting_by_reason", "Waiting requests by reason.", [*base, "reason"],
                      registry=r)
    counters = {n: Counter(n, n, base, registry=r) for n in (
        "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:prompt_tokens", "vllm:generation_tokens",
        "vllm:num_preemptions", "vllm:external_prefix_cache_queries", "vllm:external_prefix_cache_hits")}
    success = Counter("vllm:request_success", "Finished requests.", [*base, "finished_reason"], registry=r)
    hist: list[tuple[Histogram, float]] = []
    for name, buckets, value in (
        ("vllm:time_to_first_token_seconds", TTFT, 0.08), ("vllm:inter_token_latency_seconds", ITL, 0.011),
        ("vllm:request_time_per_output_token_seconds", ITL, 0.012),
        ("vllm:e2e_request_latency_seconds", LATENCY, 4.2), ("vllm:request_queue_time_seconds", LATENCY, 0.4),
        ("vllm:request_inference_time_seconds", LATENCY, 3.8), ("vllm:request_prefill_time_seconds", LATENCY, 0.1),
        ("vllm:request_decode_time_seconds", LATENCY, 3.7), ("vllm:request_prompt_tokens", TOKENS, 900),
        ("vllm:request_generation_tokens", TOKENS, 300), ("vllm:request_params_max_tokens", TOKENS, 512),
        ("vllm:request_params_n", TOKENS, 1), ("vllm:iteration_tokens_total", ITERATION, 700),
        ("vllm:request_max_num_generation_tokens", TOKENS, 512),
    ):
        hist.append((Histogram(name, name, base, buckets=buckets, registry=r), value))
    for e in range(engines):
        labels = (MODEL, str(e))
        g_run.labels(*labels).set(running + e)
        g_wait.labels(*labels).set(waiting + e)
        g_kv.labels(*labels).set(kv)
        by_reason.labels(*labels, "capacity").set(waiting)
        by_reason.labels(*labels, "deferred").set(0)
        for i, c in enumerate(counters.values()):
            c.labels(*labels).inc(1000 * (i + 1))
        for reason in ("stop", "length", "abort", "error", "repetition"):
            success.labels(*labels, reason).inc(5)
        for h, value in hist:
            for k in range(3):
                h.labels(*labels).observe(value * (k + 1))
    lora = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                 ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r)
    lora.labels("4", "sql-lora", "").set(1.7562129e9)
    lora.labels("4", "sql-lora,tweet-summary", "sql-lora-1").set(1.7562131e9)
    lora.labels("4", "", "").set(1.7562120e9)
    cache_labels = {
        "block_size": "16", "cache_dtype": "auto", "calculate_kv_scales": "False", "cpu_kvcache_space_bytes": "None",
        "cpu_offload_gb": "0", "enable_prefix_caching": "True", "engine": "0", "gpu_memory_utilization": "0.92",
        "is_attention_free": "False", "kv_sharing_fast_prefill": "False", "mamba_cache_dtype": "auto",
        "mamba_page_size_padded": "None", "mamba_ssm_cache_dtype": "auto", "num_cpu_blocks": "None",
        "num_gpu_blocks": "27793", "num_gpu_blocks_override": "None", "prefix_caching_hash_algo": "sha256",
        "sliding_window": "None", "swap_space": "4", "swap_space_bytes": "4294967296",
    }
    info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", list(cache_labels),
                 registry=r)
    info.labels(**cache_labels).set(1)
    return generate_latest(r).decode()
