"""The pure translation from API objects to epp values (no API server needed)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest

from epp.discovery.kubernetes import (
    V1_GROUP,
    V1ALPHA2_GROUP,
    PoolSpec,
    endpoints_of,
    parse_pool,
    pod_is_ready,
    policies_of,
)
from epp.domain import Criticality, FailureMode


def pod(name: str, ip: str | None = "127.0.0.2", ready: str = "True", labels: dict[str, str] | None = None,
        **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": "a"} if labels is None else labels, **meta},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
    }


SPEC = PoolSpec(selector=MappingProxyType({"app": "a"}), target_ports=(8000,), failure_mode=FailureMode.FAIL_CLOSE)


@pytest.mark.parametrize(("obj", "group", "expected"), [
    ({"spec": {"selector": {"matchLabels": {"app": "a"}}, "targetPorts": [{"number": 1}, {"number": 2}],
               "endpointPickerRef": {"failureMode": "FailOpen"}}}, V1_GROUP,
     PoolSpec({"app": "a"}, (1, 2), FailureMode.FAIL_OPEN)),
    ({"spec": {"selector": {"app": "a"}, "targetPortNumber": 8000}}, V1ALPHA2_GROUP,
     PoolSpec({"app": "a"}, (8000,), FailureMode.FAIL_CLOSE)),
    ({"spec": {"targetPorts": [{"number": p} for p in range(1, 11)]}}, V1_GROUP,
     PoolSpec({}, tuple(range(1, 9)), FailureMode.FAIL_CLOSE)),
    ({"spec": {"targetPorts": [{"number": 0}, {"number": 7}, {"number": 7}, {}]}}, V1_GROUP,
     PoolSpec({}, (7,), FailureMode.FAIL_CLOSE)),
    ({}, V1ALPHA2_GROUP, PoolSpec({}, (), FailureMode.FAIL_CLOSE)),
], ids=["v1", "v1alpha2", "at-most-8-ports", "invalid-and-duplicate-ports", "empty"])
def test_parse_pool(obj: dict[str, Any], group: str, expected: PoolSpec) -> None:
    got = parse_pool({"metadata": {"name": "p"}, **obj}, group)
    assert (dict(got.selector), got.target_ports, got.failure_mode) == (
        dict(expected.selector), expected.target_ports, expected.failure_mode)


@pytest.mark.parametrize(("obj", "ready"), [
    (pod("p"), True),
    (pod("p", ip=None), False),
    (pod("p", ready="False"), False),
    (pod("p", deletionTimestamp="2026-01-01T00:00:00Z"), False),
    ({"metadata": {"name": "p"}, "status": {"podIP": "127.0.0.2"}}, False),
], ids=["ready", "no-ip", "not-ready", "deleting", "no-conditions"])
def test_pod_is_ready(obj: dict[str, Any], ready: bool) -> None:
    assert pod_is_ready(obj) is ready


def test_endpoints_naming_selection_and_active_ports() -> None:
    three = PoolSpec(selector=MappingProxyType({"app": "a"}), target_ports=(3000, 3002, 3004),
                     failure_mode=FailureMode.FAIL_CLOSE)
    pods = [
        pod("b", "127.0.0.3", annotations={"inference.networking.k8s.io/active-ports": "3004, 3000"}),
        pod("a", "127.0.0.2"),
        pod("c", "127.0.0.4", labels={"app": "other"}),
        pod("v6", "::1"),
    ]
    got = [(e.name, e.address) for e in endpoints_of(pods, three)]
    assert got == [
        ("a-rank-0", "127.0.0.2:3000"), ("a-rank-1", "127.0.0.2:3002"), ("a-rank-2", "127.0.0.2:3004"),
        ("b-rank-0", "127.0.0.3:3000"), ("b-rank-2", "127.0.0.3:3004"),
        ("v6-rank-0", "[::1]:3000"), ("v6-rank-1", "[::1]:3002"), ("v6-rank-2", "[::1]:3004"),
    ]
    assert [e.name for e in endpoints_of(pods, SPEC)] == ["a", "v6"]  # 8000 is not among b's active ports
    # An empty selector selects nothing (the APIs require one; "everything" would be a surprise).
    assert endpoints_of(pods, PoolSpec(MappingProxyType({}), (8000,), FailureMode.FAIL_CLOSE)) == ()


def test_policies_unknown_criticality_and_missing_weights() -> None:
    models = [{"metadata": {"name": "m", "creationTimestamp": "2026-01-01T00:00:00Z"},
               "spec": {"modelName": "m", "criticality": "Urgent", "poolRef": {"name": "pool"},
                        "targetModels": [{"name": "m-a"}, {"name": "m-b"}]}}]
    policies = policies_of(models, [], pool_name="pool", pool_group=V1ALPHA2_GROUP)
    assert policies.models is not None
    assert policies.models["m"].criticality is Criticality.STANDARD
    assert [t.weight for t in policies.models["m"].targets] == [1, 1]
    assert policies_of(models, [], pool_name="pool", pool_group=V1_GROUP).models is None  # group mismatch
