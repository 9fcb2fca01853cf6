"""``epp.observability.hot``: the request path's histograms expose what prometheus_client's do."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from epp.observability.hot import HotHistogram

BUCKETS = (0.005, 0.025, 1.0, 2, 3)
VALUES = (0.001, 0.005, 0.02, 1.0, 2.5, 99.0, 0.0, 3.0)


def _lines(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_exposition_matches_prometheus_client_histograms():
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    labelled = Histogram("req_seconds", "doc", ["model", "target"], buckets=BUCKETS, registry=theirs)
    hot_labelled = HotHistogram("req_seconds", "doc", ["model", "target"], buckets=BUCKETS, registry=ours)
    bare = Histogram("pick_seconds", "doc", buckets=BUCKETS, registry=theirs)
    hot_bare = HotHistogram("pick_seconds", "doc", buckets=BUCKETS, registry=ours)
    for i, v in enumerate(VALUES):
        pair = ("a", "b") if i % 3 else ("c", "c")
        labelled.labels(*pair).observe(v)
        hot_labelled.labels(*pair).observe(v)
        bare.observe(v)
        hot_bare.observe(v)
    assert _lines(ours) == _lines(theirs)
    # a value equal to a bound is inside it (le), and +Inf holds everything
    assert ours.get_sample_value("pick_seconds_bucket", {"le": "0.005"}) == 3  # 0.001, 0.005, 0.0
    assert ours.get_sample_value("pick_seconds_bucket", {"le": "3.0"}) == 7
    assert ours.get_sample_value("pick_seconds_bucket", {"le": "+Inf"}) == len(VALUES)
    assert math.isclose(ours.get_sample_value("pick_seconds_sum") or 0, sum(VALUES))


def test_children_are_kept_per_label_values():
    registry = CollectorRegistry()
    hist = HotHistogram("h", "doc", ["x"], buckets=(1, math.inf), registry=registry)
    assert hist.labels("a") is hist.labels("a")
    assert hist.labels("a") is not hist.labels("b")
    hist.labels(7).observe(0.5)  # label values are strings in the exposition, as prometheus_client makes them
    assert hist.labels("7") is hist.labels(7)
    assert registry.get_sample_value("h_bucket", {"x": "7", "le": "1.0"}) == 1
    assert registry.get_sample_value("h_bucket", {"x": "7", "le": "+Inf"}) == 1


def test_misuse_is_refused():
    registry = CollectorRegistry()
    labelled = HotHistogram("h", "doc", ["x"], buckets=(1,), registry=registry)
    with pytest.raises(ValueError, match="labels"):
        labelled.labels("a", "b")
    with pytest.raises(ValueError, match="labelled"):
        labelled.observe(1.0)
    for buckets in ((), (2, 1), (1, 1), (1, math.inf, 2)):
        with pytest.raises(ValueError, match="increasing"):
            HotHistogram("bad", "doc", buckets=buckets, registry=CollectorRegistry())
    with pytest.raises(ValueError):  # the registry refuses a second metric of the same name
        HotHistogram("h", "doc", buckets=(1,), registry=registry)
