from __future__ import annotations

from prometheus_client import CollectorRegistry

from epp.observability.metrics import OTHER, EppMetrics, ModelLabels


def series_count(registry: CollectorRegistry, family: str) -> int:
    return sum(len(m.samples) for m in registry.collect() if m.name == family)


def test_without_an_allowlist_the_first_names_are_labels_and_the_rest_other():
    labels = ModelLabels(lambda: None, spare=3)
    assert [labels(n) for n in ("a", "b", "a", "c", "d", "e", "b")] == ["a", "b", "a", "c", OTHER, OTHER, "b"]


def test_with_an_allowlist_only_its_names_are_labels():
    labels = ModelLabels(lambda: frozenset({"llama", "llama-target"}))
    assert [labels(n) for n in ("llama", "llama-target", "evil", "")] == ["llama", "llama-target", OTHER, ""]


def test_two_thousand_unknown_names_add_a_bounded_number_of_series():
    registry = CollectorRegistry()
    metrics = EppMetrics(registry, known_models=lambda: None)
    for i in range(2000):
        metrics.series(f"model-{i}", f"model-{i}").requests.inc()
        metrics.request_error_total.labels(f"model-{i}", f"model-{i}", "NotFound").inc()
    assert series_count(registry, "inference_model_request") <= 2 * (32 + 1)  # _total and _created samples
    assert series_count(registry, "inference_model_request_error") <= 2 * (32 + 1)
    other = {"model_name": OTHER, "target_model_name": OTHER}
    assert registry.get_sample_value("inference_model_request_total", other) == 2000 - 32
