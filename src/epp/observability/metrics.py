"""Every Prometheus metric epp exports, on an injected registry.

Names and labels follow the Go reference EPP (``inference_model_*`` family of v1.0,
``inference_pool_*``, ``inference_extension_*``), so existing dashboards work.
Labels carry bounded values only (model names, error codes, pool and pod names).  Model
names come from clients, so :class:`ModelLabels` bounds them: with a model allowlist only
its names (and their target models) are label values; without one, the first
``spare`` distinct names are, and every later one is counted as ``other``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from epp.observability.hot import HotHistogram

_DURATION_BUCKETS = (
    0.005,
    0.025,
    0.05,
    0.1,
    0.2,
    0.4,
    0.6,
    0.8,
    1.0,
    1.25,
    1.5,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    15,
    20,
    30,
    45,
    60,
    120,
    180,
    240,
    300,
    360,
    480,
    600,
    900,
    1200,
    1800,
    2700,
    3600,
)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072)
_SCHEDULER_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
_TOKENIZE_BUCKETS = (*_SCHEDULER_BUCKETS, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class ModelSeries:
    """The labelled children for one (model, target model) pair, resolved once."""

    requests: Any
    duration: Any
    input_tokens: Any
    output_tokens: Any
    running: Any


OTHER = "other"
KnownModels = Callable[[], Collection[str] | None]  # None: no allowlist, any name is legitimate


class ModelLabels:
    """Maps a client-supplied model name to a bounded label value."""

    def __init__(self, known: KnownModels | None = None, *, spare: int = 32) -> None:
        self._known = known
        self._spare = spare
        self._seen: set[str] = set()

    def __call__(self, name: str) -> str:
        known = self._known() if self._known is not None else None
        if known is not None:
            return name if name in known or not name else OTHER
        if name in self._seen or not name:
            return name
        if len(self._seen) < self._spare:
            self._seen.add(name)
            return name
        return OTHER


class _ModelLabelled:
    """A metric whose first two labels are model names: ``labels()`` bounds them."""

    def __init__(self, metric: Any, bound: ModelLabels) -> None:
        self._metric = metric
        self._bound = bound

    def labels(self, model: str, target: str, *rest: str) -> Any:
        return self._metric.labels(self._bound(model), self._bound(target), *rest)


class EppMetrics:
    """The metric objects; construct one per process (or per test) with its registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, known_models: KnownModels | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.model_label = ModelLabels(known_models)
        model = ["model_name", "target_model_name"]
        self.request_total = Counter("inference_model_request", "Requests routed per model.", model, registry=r)
        self.request_error_total = _ModelLabelled(
            Counter(
                "inference_model_request_error", "Requests that ended in an error.", [*model, "error_code"], registry=r
            ),
            self.model_label,
        )
        self.request_duration = HotHistogram(
            "inference_model_request_duration_seconds",
            "Request latency seen by epp.",
            model,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.input_tokens = HotHistogram(
            "inference_model_input_tokens",
            "Prompt tokens per request (from usage).",
            model,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.output_tokens = HotHistogram(
            "inference_model_output_tokens",
            "Completion tokens per request (from usage).",
            model,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.running_requests = Gauge(
            "inference_model_running_requests",
            "Requests epp routed and has not seen finish.",
            ["model_name"],
            registry=r,
        )
        self.scheduler_e2e = HotHistogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Time to make one scheduling decision.",
            buckets=_SCHEDULER_BUCKETS,
            registry=r,
        )
        self.streams = Gauge("epp_extproc_streams", "Open ext_proc streams.", registry=r)
        self.rejections_total = Counter(
            "epp_rejections", "Requests answered by epp itself, by reason.", ["reason"], registry=r
        )
        self.scrape_errors_total = Counter(
            "inference_pool_scrape_errors",
            "Failed metric scrapes per endpoint, by reason.",
            ["name", "model_server_pod", "reason"],
            registry=r,
        )
        self.background_failures_total = Counter(
            "epp_background_task_failures",
            "Background tasks (scrapers, discovery) that raised and were restarted, by task kind.",
            ["task"],
            registry=r,
        )
        self.plugin_duration = HotHistogram(
            "inference_extension_plugin_duration_seconds",
            "Time spent in one scheduling plugin.",
            ["extension_point", "plugin_type", "plugin_name"],
            buckets=_SCHEDULER_BUCKETS,
            registry=r,
        )
        self.tokenize_duration = HotHistogram(
            "epp_tokenize_duration_seconds",
            "Calls to a model server's /tokenize before a decision (tokenizer: vllm-tokenize), by outcome "
            "(ok, timeout, error, no_server, cancelled).",
            ["outcome"],
            buckets=_TOKENIZE_BUCKETS,
            registry=r,
        )
        self._series: dict[tuple[str, str], ModelSeries] = {}

    def plugin_timer(self, extension_point: str, plugin_type: str, plugin_name: str) -> Callable[[float], None]:
        """The duration observer of one scheduling plugin (resolved once, when a scheduler is built)."""
        return self.plugin_duration.labels(extension_point, plugin_type, plugin_name).observe

    def observe_tokenize(self, outcome: str, seconds: float) -> None:
        self.tokenize_duration.labels(outcome).observe(seconds)

    def series(self, model: str, target: str) -> ModelSeries:
        """Children for one model pair; cached because ``labels()`` costs a lock and a dict walk."""
        model, target = self.model_label(model), self.model_label(target)
        key = (model, target)
        found = self._series.get(key)
        if found is None:
            if len(self._series) >= 4096:  # bounded labels make this rare: keep the cache bounded anyway
                self._series.clear()
            found = self._series[key] = ModelSeries(
                requests=self.request_total.labels(model, target),
                duration=self.request_duration.labels(model, target),
                input_tokens=self.input_tokens.labels(model, target),
                output_tokens=self.output_tokens.labels(model, target),
                running=self.running_requests.labels(model),
            )
        return found


@dataclass(frozen=True, slots=True)
class PodLoad:
    pod: str
    inflight: int
    queue: int | None = None  # None: no fresh scrape
    running: int | None = None
    kv_usage: float | None = None
    peer_inflight: int = 0  # what the peers (other replicas, sibling workers) report in flight there


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    name: str
    pods: Sequence[PodLoad]
    peers: bool = False  # peer sync is on: the peer gauge is exported


class PoolCollector(Collector):
    """Pool gauges computed at scrape time from the datastore, so they can never drift.

    As in the reference EPP, endpoints without fresh metrics are left out of
    ``ready_pods`` and the averages.
    """

    def __init__(self, snapshot: Callable[[], PoolSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self._snapshot()
        fresh = [p for p in snap.pods if p.queue is not None]

        def pool_gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["name"])
            g.add_metric([snap.name], value)
            return g

        def avg(values: list[float]) -> float:
            return sum(values) / len(values) if values else 0.0

        yield pool_gauge("inference_pool_ready_pods", "Endpoints with fresh metrics.", len(fresh))
        yield pool_gauge(
            "inference_pool_average_kv_cache_utilization",
            "Mean KV-cache use of fresh endpoints.",
            avg([p.kv_usage or 0.0 for p in fresh]),
        )
        yield pool_gauge(
            "inference_pool_average_queue_size",
            "Mean waiting requests of fresh endpoints.",
            avg([float(p.queue or 0) for p in fresh]),
        )
        yield pool_gauge(
            "inference_pool_average_running_requests",
            "Mean running requests of fresh endpoints.",
            avg([float(p.running or 0) for p in fresh]),
        )
        labels = ["name", "model_server_pod"]
        queue = GaugeMetricFamily("inference_pool_per_pod_queue_size", "Waiting requests per endpoint.", labels=labels)
        for p in fresh:
            queue.add_metric([snap.name, p.pod], float(p.queue or 0))
        yield queue
        inflight = GaugeMetricFamily(
            "inference_pool_per_pod_inflight_requests", "epp's own in-flight requests per endpoint.", labels=labels
        )
        for p in snap.pods:
            inflight.add_metric([snap.name, p.pod], p.inflight)
        yield inflight
        if snap.peers:
            peer = GaugeMetricFamily(
                "epp_peer_inflight_requests",
                "In-flight requests per endpoint that the peers (other replicas, sibling workers) report; "
                "the scheduler adds them to epp's own.",
                labels=labels,
            )
            for p in snap.pods:
                peer.add_metric([snap.name, p.pod], p.peer_inflight)
            yield peer
