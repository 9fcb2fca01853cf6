"""One pod's `/metrics`, in vLLM's exposition form.

Owns a per-pod `prometheus_client.CollectorRegistry` with vLLM 0.33 names, labels, help texts
and buckets; how engine steps move them; and rendering with the `name[]` filter, content
negotiation and gzip exactly as `prometheus_client`'s own ASGI app (which vLLM mounts) does.

`name[]` matches *sample* names, as in `prometheus_client`: ask for
`vllm:num_preemptions_total` (not `vllm:num_preemptions`) and for a histogram's
`..._bucket`, `..._sum`, `..._count`; a bare family name of a counter or histogram matches
nothing, on real vLLM too.

Formats: `vllm-0.33` (labels `engine`, `model_name`; `vllm:kv_cache_usage_perc`,
`vllm:prefix_cache_*`) and `vllm-legacy` (pre-0.9 V0 style: label `model_name` only,
`vllm:gpu_cache_usage_perc`, `vllm:gpu_prefix_cache_*`, plus `vllm:time_per_output_token_seconds`).

Invariants: gauges are set from `EngineState` after every engine change (or from a test
override); `vllm:lora_requests_info` gets one series per label combination whose value is the
wall-clock time it was last current, keeping at most `_MAX_LORA_SERIES` series.
"""

from __future__ import annotations

import gzip
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder, gzip_accepted

from epp_sim.domain import EngineConfig, EngineState
from epp_sim.engine import StepOutput

__all__ = ["METRICS_FORMATS", "MetricsOverride", "PodMetrics"]

METRICS_FORMATS = ("vllm-0.33", "vllm-legacy")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_MAX_LORA_SERIES = 32


@dataclass(frozen=True, slots=True)
class MetricsOverride:
    """Fixed gauge values that replace the engine's (test hook); None keeps the real value."""

    waiting: int | None = None
    running: int | None = None
    kv_usage: float | None = None
    running_adapters: tuple[str, ...] | None = None
    waiting_adapters: tuple[str, ...] | None = None


class PodMetrics:
    """The vLLM metric families of one pod and how they move."""

    def __init__(
        self,
        model_name: str,
        config: EngineConfig,
        *,
        metrics_format: str = "vllm-0.33",
        engine_index: str = "0",
        lora_enabled: bool = True,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if metrics_format not in METRICS_FORMATS:
            raise ValueError(f"unknown metrics format {metrics_format!r}")
        legacy = metrics_format == "vllm-legacy"
        self.registry = CollectorRegistry(auto_describe=True)
        self._wall = wall_clock
        self._max_loras = str(config.max_loras)
        self._override = MetricsOverride()
        self._lora_series: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._synced: dict[int, int] = {}
        names = ["model_name"] if legacy else ["engine", "model_name"]
        values = [model_name] if legacy else [engine_index, model_name]
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=reg).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=reg).labels(*values)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=reg).labels(*values)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.waiting_capacity: Gauge | None = None
        self.waiting_deferred: Gauge | None = None
        if legacy:
            self.kv_usage = gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.")
        else:
            self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
            by_reason = Gauge(
                "vllm:num_requests_waiting_by_reason",
                "Number of requests waiting to be processed, by reason.",
                [*names, "reason"],
                registry=reg,
            )
            self.waiting_capacity = by_reason.labels(*values, "capacity")
            self.waiting_deferred = by_reason.labels(*values, "deferred")
        prefix = "vllm:gpu_prefix_cache" if legacy else "vllm:prefix_cache"
        self.prefix_queries = counter(
            f"{prefix}_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_hits = counter(f"{prefix}_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*names, "finished_reason"],
            registry=reg,
        )
        self._success_values = values
        for reason in ("stop", "length", "abort", "error", "repetition"):
            self._success.labels(*values, reason)
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.tpot: Histogram | None = None
        if legacy:
            self.tpot = histogram(
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds.",
                ITL_BUCKETS,
            )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            LATENCY_BUCKETS,
        )
        self._lora: Gauge | None = None
        if lora_enabled:
            self._lora = Gauge(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                registry=reg,
            )
        cache_labels = {
            "block_size": str(config.block_size),
            "cache_dtype": "auto",
            "calculate_kv_scales": "False",
            "enable_prefix_caching": "True",
            "gpu_memory_utilization": "0.92",
            "is_attention_free": "False",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(config.num_gpu_blocks),
            "prefix_caching_hash_algo": "xxhash",
            "sliding_window": "None",
            "swap_space": "4",
        }
        if not legacy:
            cache_labels["engine"] = engine_index
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            sorted(cache_labels),
            registry=reg,
        )
        info.labels(**cache_labels).set(1.0)

    def set_override(self, override: MetricsOverride | None) -> None:
        """Replace (or with None, stop replacing) gauge values; takes effect at the next update."""
        self._override = override or MetricsOverride()

    def update(self, state: EngineState) -> None:
        """Set the gauges from the engine's current state."""
        o = self._override
        waiting = state.waiting if o.waiting is None else o.waiting
        self.running.set(state.running if o.running is None else o.running)
        self.waiting.set(waiting)
        self.kv_usage.set(state.kv_usage if o.kv_usage is None else o.kv_usage)
        if self.waiting_capacity is not None and self.waiting_deferred is not None:
            deferred = min(state.deferred, waiting)
            self.waiting_capacity.set(waiting - deferred)
            self.waiting_deferred.set(deferred)
        if self._lora is not None:
            running = state.running_adapters if o.running_adapters is None else o.running_adapters
            queued = state.waiting_adapters if o.waiting_adapters is None else o.waiting_adapters
            key = (",".join(running), ",".join(queued))
            self._lora.labels(self._max_loras, *key).set(self._wall())
            series = self._lora_series
            series[key] = None
            series.move_to_end(key)
            if len(series) > _MAX_LORA_SERIES:
                old = next(iter(series))
                del series[old]
                self._lora.remove(self._max_loras, *old)

    def observe_step(self, out: StepOutput, preemptions: int, prefix_queries: int, prefix_hits: int) -> None:
        """Record one completed step; the three counts are the engine's cumulative counters."""
        end = out.end
        for req in out.first_tokens:
            self.ttft.observe(end - req.received_at)
            self.prompt_tokens.inc(req.prompt.num_tokens)
        for itl in out.itls:
            self.itl.observe(itl)
            if self.tpot is not None:
                self.tpot.observe(itl)
        self.generation_tokens.inc(len(out.emitted))
        for req in out.finished:
            self.e2e.observe(end - req.received_at)
            if req.first_scheduled is not None:
                self.queue_time.observe(req.first_scheduled - req.received_at)
            self._success.labels(*self._success_values, req.finish_reason or "stop").inc()
        for counter, total in (
            (self.preemptions, preemptions),
            (self.prefix_queries, prefix_queries),
            (self.prefix_hits, prefix_hits),
        ):
            delta = total - self._synced.get(id(counter), 0)
            if delta > 0:
                counter.inc(delta)
                self._synced[id(counter)] = total

    def observe_abort(self) -> None:
        """Count a request the client abandoned."""
        self._success.labels(*self._success_values, "abort").inc()

    def render(self, names: Sequence[str], accept: str, accept_encoding: str) -> tuple[bytes, dict[str, str]]:
        """Exposition body and headers, honouring `name[]`, Accept and Accept-Encoding."""
        encoder, content_type = choose_encoder(accept)
        source = self.registry.restricted_registry(names) if names else self.registry
        body = encoder(source)
        headers = {"Content-Type": content_type}
        if gzip_accepted(accept_encoding):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return body, headers
