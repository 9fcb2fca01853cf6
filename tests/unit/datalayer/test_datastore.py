"""The datastore (``epp/datalayer/datastore.py``): pools, readiness, metrics, staleness, read-only views."""

from __future__ import annotations

import pytest

from epp.datalayer import Datastore
from epp.domain import Endpoint, EndpointMetrics, ModelPolicies

from support import datastore, pool

A, B, C = Endpoint("10.0.0.1:80", "a"), Endpoint("10.0.0.2:80", "b"), Endpoint("10.0.0.3:80", "c")


def test_readiness_follows_the_pool_and_listeners_see_every_change():
    store = Datastore()
    calls = []
    store.on_change(lambda: calls.append(len(store.endpoints())))
    assert not store.ready and store.endpoints() == ()
    store.set_pool(pool([A]))
    store.set_policies(ModelPolicies.of({}))
    store.set_pool(None)  # the InferencePool was deleted
    assert calls == [1, 1, 0] and not store.ready and store.endpoints() == ()


def test_staleness_is_judged_by_the_datastores_own_clock():
    now = [100.0]
    store = datastore([A, B], clock=lambda: now[0], staleness=2.0)
    store.set_metrics(A.address, EndpointMetrics(waiting=3, updated_at=99.0))
    store.set_metrics(B.address, EndpointMetrics(waiting=4, updated_at=97.5))
    assert store.fresh_metrics(A.address) is not None and store.fresh_metrics(B.address) is None
    fresh = store.fresh_metrics_of([A.address, B.address, C.address])
    assert [m.waiting if m else None for m in fresh] == [3, None, None]
    now[0] = 101.5
    assert store.fresh_metrics(A.address) is None and store.metrics(A.address) is not None  # stale, not forgotten


def test_views_are_read_only():
    store = datastore([A], models={})
    store.load.acquire(A)
    with pytest.raises(TypeError):
        store.load.requests[A.address] = 0  # type: ignore[index]
    with pytest.raises(TypeError):
        store.policies.objectives["x"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        store.metrics_view[A.address] = EndpointMetrics()  # type: ignore[index]
    store.set_metrics(A.address, EndpointMetrics(active_adapters=frozenset({"lora"})))
    assert isinstance(store.endpoints_with_adapter("lora"), frozenset)
    assert isinstance(store.endpoints(), tuple)


def test_mirror_pool_membership_and_pool_of():
    store = datastore([A, B], mirror=[C])
    assert store.endpoints() == (A, B) and store.mirror_endpoints() == (C,)
    assert sorted(e.name for e in store.all_endpoints()) == ["a", "b", "c"]
    assert store.pool_of(C.address).name == "p-shadow" and store.pool_of(A.address).name == "p"
    store.set_mirror(None)
    assert store.pool_of(C.address) is None and store.get(C.address) is None


def test_metrics_and_adapter_index_follow_membership():
    store = datastore([A, B])
    store.set_metrics(A.address, EndpointMetrics(active_adapters=frozenset({"x"})))
    store.set_metrics(B.address, EndpointMetrics(active_adapters=frozenset({"x", "y"})))
    assert store.endpoints_with_adapter("x") == {A.address, B.address}
    store.set_metrics(B.address, EndpointMetrics(active_adapters=frozenset({"y"})))
    assert store.endpoints_with_adapter("x") == {A.address}
    store.set_pool(pool([A]))  # B left: its metrics and adapters go
    assert store.metrics(B.address) is None and store.endpoints_with_adapter("y") == frozenset()
    store.set_metrics(B.address, EndpointMetrics())  # a late scrape of a departed endpoint is ignored
    assert store.metrics(B.address) is None


def test_unreachable_endpoints_are_not_routable_unless_all_are():
    store = datastore([A, B, C])
    assert store.routable() == (A, B, C)
    store.set_unreachable(B.address, True)
    assert store.routable() == (A, C) and store.endpoints() == (A, B, C)  # still a member
    store.set_unreachable(A.address, True)
    store.set_unreachable(C.address, True)
    assert store.routable() == (A, B, C)  # nobody answers: do not refuse everything
    store.set_metrics(A.address, EndpointMetrics())  # A answered again
    assert store.routable() == (A,)
    store.set_pool(pool([A, B]))  # membership changes keep the marks of those who stay
    assert store.routable() == (A,)


def test_what_each_endpoint_serves_is_indexed_and_follows_membership():
    store = datastore([A, B, C])
    v0 = store.serving_version
    store.set_served_models(A.address, frozenset({"base", "sql-lora"}))
    store.set_served_models(B.address, frozenset({"base"}))
    assert store.servers_of("sql-lora") == {A.address} and store.servers_of("base") == {A.address, B.address}
    assert store.served_models(C.address) is None and store.serving_version > v0
    store.set_metrics(C.address, EndpointMetrics(active_adapters=frozenset({"sql-lora"})))
    assert store.servers_of("sql-lora") == {A.address, C.address}  # running it counts too
    store.set_pool(pool([B, C]))
    assert store.servers_of("sql-lora") == {C.address} and store.served_models(A.address) is None
    store.set_served_models(A.address, frozenset({"x"}))  # a late answer from a departed endpoint
    assert store.servers_of("x") == frozenset()
