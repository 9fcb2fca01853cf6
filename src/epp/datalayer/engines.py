"""Which metric families mean what, per model-server engine: one table, data only.

Each semantic (queue, running, KV use, LoRA info, cache geometry) maps to one or more
``MetricSpec`` alternatives tried in order; the first family present in a scrape wins
(so vLLM's current ``kv_cache_usage_perc`` and its pre-0.9 ``gpu_cache_usage_perc``
both work).  A spec may require label values (Triton reports several quantities as
label values of one family).  Names follow GIE proposal 003 and the llm-d extractor.
"""

from __future__ import annotations

from dataclasses import dataclass

ENGINE_LABEL = "inference.networking.k8s.io/engine-type"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class EngineMapping:
    engine: str
    waiting: tuple[MetricSpec, ...]
    running: tuple[MetricSpec, ...]
    kv_usage: tuple[MetricSpec, ...]
    lora_info: MetricSpec | None = None
    cache_info: MetricSpec | None = None  # geometry as labels of an info gauge
    block_size_label: str = "block_size"
    num_blocks_label: str = "num_gpu_blocks"
    block_size: tuple[MetricSpec, ...] = ()  # geometry as plain gauges
    num_blocks: tuple[MetricSpec, ...] = ()

    def families(self) -> tuple[str, ...]:
        """Family names to ask for with ``?name[]=`` (deduplicated, in a stable order)."""
        specs = [*self.waiting, *self.running, *self.kv_usage, *self.block_size, *self.num_blocks]
        if self.lora_info:
            specs.append(self.lora_info)
        if self.cache_info:
            specs.append(self.cache_info)
        return tuple(dict.fromkeys(s.name for s in specs))


def _specs(*names: str) -> tuple[MetricSpec, ...]:
    return tuple(MetricSpec(n) for n in names)


def _triton(kind: str, value: str) -> MetricSpec:
    family = "nv_trt_llm_request_metrics" if kind == "request_type" else "nv_trt_llm_kv_cache_block_metrics"
    return MetricSpec(family, ((kind, value),))


ENGINES: dict[str, EngineMapping] = {
    "vllm": EngineMapping(
        engine="vllm",
        waiting=_specs("vllm:num_requests_waiting"),
        running=_specs("vllm:num_requests_running"),
        kv_usage=_specs("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        lora_info=MetricSpec("vllm:lora_requests_info"),
        cache_info=MetricSpec("vllm:cache_config_info"),
    ),
    "sglang": EngineMapping(
        engine="sglang",
        waiting=_specs("sglang:num_queue_reqs"),
        running=_specs("sglang:num_running_reqs"),
        kv_usage=_specs("sglang:token_usage"),
        cache_info=MetricSpec("sglang:cache_config_info"),
        block_size_label="page_size",
        num_blocks_label="num_pages",
        block_size=_specs("sglang:page_size"),
        num_blocks=_specs("sglang:num_pages"),
    ),
    "trtllm-serve": EngineMapping(
        engine="trtllm-serve",
        waiting=_specs("trtllm_num_requests_waiting"),
        running=_specs("trtllm_num_requests_running"),
        kv_usage=_specs("trtllm_kv_cache_utilization"),
        block_size=_specs("trtllm_kv_cache_tokens_per_block"),
        num_blocks=_specs("trtllm_kv_cache_max_blocks"),
    ),
    "triton-tensorrt-llm": EngineMapping(
        engine="triton-tensorrt-llm",
        waiting=(_triton("request_type", "waiting"),),
        running=(_triton("request_type", "scheduled"),),
        kv_usage=(_triton("kv_cache_block_type", "fraction"),),
        block_size=(_triton("kv_cache_block_type", "tokens_per"),),
        num_blocks=(_triton("kv_cache_block_type", "max"),),
    ),
}


def engine_for(pool_engine: str, labels: dict[str, str] | None = None) -> EngineMapping:
    """The pod label wins over the pool's engine; unknown names fall back to vLLM."""
    name = (labels or {}).get(ENGINE_LABEL) or pool_engine
    return ENGINES.get(name, ENGINES["vllm"])
