"""InferencePool + Pods → the pool's endpoints, against a real kube-apiserver."""

from __future__ import annotations

import dataclasses
import statistics
import time

from tools.kube.admin import V1, V1ALPHA2, Admin
from tools.kube.cluster import KubeCluster

from epp.discovery.kubernetes import V1ALPHA2_GROUP
from epp.domain import FailureMode

from .kube_support import FAST, Sources, v1_pool

APP = {"app": "vllm"}


async def ready_pod(admin: Admin, ns: str, name: str, ip: str, labels: dict[str, str] = APP, **kw: object) -> None:
    await admin.create_pod(ns, name, labels, **kw)  # type: ignore[arg-type]
    await admin.set_pod_status(ns, name, ip, ready=True)


async def test_endpoints_follow_pod_ip_readiness_and_deletion(admin: Admin, namespace: str, sources: Sources) -> None:
    ns, sink = namespace, sources.sink
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool(APP, [8000]))
    await admin.create_pod(ns, "p1", {**APP, "inference.networking.k8s.io/engine-type": "sglang"})
    await admin.create_pod(ns, "p2", APP)
    await ready_pod(admin, ns, "other", "127.0.0.9", {"app": "something-else"})
    source = await sources.start(timing=dataclasses.replace(FAST, page_size=1))  # the list is paged
    assert source._pods is not None and set(source._pods.items) == {"p1", "p2"}  # both pages, selector applied
    assert sink.pool is not None and sink.pool.endpoints == ()  # listed: pool known, no ready pod yet
    assert sink.pool.target_ports == (8000,) and dict(sink.pool.selector) == APP

    await admin.set_pod_status(ns, "p1", None, ready=True)  # Ready without an IP: not an endpoint
    await admin.set_pod_status(ns, "p2", "127.0.0.3", ready=False)  # an IP, not Ready
    await admin.set_pod_status(ns, "p1", "127.0.0.2", ready=True)
    await sink.wait_addresses({"127.0.0.2:8000"})
    (p1,) = sink.pool.endpoints
    assert p1.name == "p1" and p1.labels["inference.networking.k8s.io/engine-type"] == "sglang"

    await admin.set_pod_status(ns, "p2", "127.0.0.3", ready=True)
    await sink.wait_addresses({"127.0.0.2:8000", "127.0.0.3:8000"})
    await admin.set_pod_status(ns, "p1", "127.0.0.2", ready=False)  # readiness flaps
    await sink.wait_addresses({"127.0.0.3:8000"})
    await admin.set_pod_status(ns, "p1", "127.0.0.4", ready=True)  # back, with a new IP
    await sink.wait_addresses({"127.0.0.4:8000", "127.0.0.3:8000"})
    await admin.delete_pod(ns, "p2")
    await sink.wait_addresses({"127.0.0.4:8000"})

    # A pod being deleted (deletionTimestamp set, held by a finalizer) stops being an endpoint at once.
    await ready_pod(admin, ns, "p3", "127.0.0.5", finalizers=["epp.test/hold"])
    await sink.wait_addresses({"127.0.0.4:8000", "127.0.0.5:8000"})
    await admin.delete_pod(ns, "p3")
    await sink.wait_addresses({"127.0.0.4:8000"})
    await admin.patch_pod(ns, "p3", {"metadata": {"finalizers": None}})  # let it go
    assert source.changed.is_set()


async def test_three_target_ports_give_one_endpoint_per_pod_and_port(
    kube_cluster: KubeCluster, admin: Admin, namespace: str, sources: Sources
) -> None:
    ns, sink = namespace, sources.sink
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool(APP, [3000, 3002, 3004]))
    await ready_pod(admin, ns, "dp", "127.0.0.2")
    await ready_pod(admin, ns, "dq", "127.0.0.3")
    await sources.start(kubeconfig=str(kube_cluster.kubeconfig))  # --kubeconfig: the source's own client
    await sink.wait_addresses({f"127.0.0.{i}:{p}" for i in (2, 3) for p in (3000, 3002, 3004)})
    assert [e.name for e in sink.pool.endpoints[:3]] == ["dp-rank-0", "dp-rank-1", "dp-rank-2"]

    # A pod may serve only some ranks (GIE's active-ports annotation).
    await admin.patch_pod(ns, "dq", {"metadata": {"annotations": {"inference.networking.k8s.io/active-ports": "3002"}}})
    await sink.wait_addresses({"127.0.0.2:3000", "127.0.0.2:3002", "127.0.0.2:3004", "127.0.0.3:3002"})

    # Target ports change live; with one port an endpoint is named after its pod.
    await admin.patch(V1, "inferencepools", ns, "pool", {"targetPorts": [{"number": 3002}]})
    await sink.wait_addresses({"127.0.0.2:3002", "127.0.0.3:3002"})
    assert [e.name for e in sink.pool.endpoints] == ["dp", "dq"]
    assert sink.pool.target_ports == (3002,)


async def test_v1alpha2_pool_shape(admin: Admin, namespace: str, sources: Sources) -> None:
    ns, sink = namespace, sources.sink
    spec = {"selector": APP, "targetPortNumber": 8000,
            "extensionRef": {"name": "epp", "failureMode": "FailOpen"}}
    await admin.create(V1ALPHA2, "inferencepools", ns, "alpha", spec)
    await admin.create(V1, "inferencepools", ns, "alpha", v1_pool({"app": "nothing"}, [9999]))  # other group
    await ready_pod(admin, ns, "a1", "127.0.0.2")
    await sources.start("alpha", group=V1ALPHA2_GROUP)
    await sink.wait_addresses({"127.0.0.2:8000"})
    assert sink.pool.failure_mode is FailureMode.FAIL_OPEN and sink.pool.name == "alpha"
    await admin.patch(V1ALPHA2, "inferencepools", ns, "alpha",
                      {"targetPortNumber": 8001, "extensionRef": {"failureMode": "FailClose"}})
    await sink.wait_addresses({"127.0.0.2:8001"})
    assert sink.pool.failure_mode is FailureMode.FAIL_CLOSE


async def test_selector_change_reselects_pods_live(admin: Admin, namespace: str, sources: Sources) -> None:
    ns, sink = namespace, sources.sink
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool({"app": "a"}, [8000]))
    await ready_pod(admin, ns, "a1", "127.0.0.2", {"app": "a"})
    await ready_pod(admin, ns, "b1", "127.0.0.3", {"app": "b"})
    await sources.start()
    await sink.wait_addresses({"127.0.0.2:8000"})
    await admin.patch(V1, "inferencepools", ns, "pool", {"selector": {"matchLabels": {"app": "b"}}})
    await sink.wait_addresses({"127.0.0.3:8000"})
    # The new selector's watch is live: a new matching pod appears, the old label is ignored.
    await ready_pod(admin, ns, "b2", "127.0.0.4", {"app": "b"})
    await ready_pod(admin, ns, "a2", "127.0.0.5", {"app": "a"})
    await sink.wait_addresses({"127.0.0.3:8000", "127.0.0.4:8000"})
    # Relabelling a pod moves it in or out.
    await admin.patch_pod(ns, "a1", {"metadata": {"labels": {"app": "b"}}})
    await sink.wait_addresses({"127.0.0.2:8000", "127.0.0.3:8000", "127.0.0.4:8000"})
    assert "127.0.0.5:8000" not in sink.addresses()


async def test_pool_deleted_then_recreated(admin: Admin, namespace: str, sources: Sources) -> None:
    ns, sink = namespace, sources.sink
    await ready_pod(admin, ns, "p1", "127.0.0.2")
    await sources.start()
    assert sink.pools == [None]  # no pool yet: nothing to serve (readiness NOT_SERVING)
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool(APP, [8000]))
    await sink.wait_addresses({"127.0.0.2:8000"})
    await admin.delete(V1, "inferencepools", ns, "pool")
    await sink.wait_for(lambda s: s.pool is None, what="pool cleared")
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool(APP, [8080]))
    await sink.wait_addresses({"127.0.0.2:8080"})


async def test_readiness_latency(admin: Admin, namespace: str, sources: Sources) -> None:
    """Pod Ready → endpoint, and NotReady → gone, 20 times each: each within 2 s (p50 is ~10 ms)."""
    ns, sink = namespace, sources.sink
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool(APP, [8000]))
    await admin.create_pod(ns, "flap", APP)
    await sources.start()
    up: list[float] = []
    down: list[float] = []
    for _ in range(20):
        t0 = time.perf_counter()
        await admin.set_pod_status(ns, "flap", "127.0.0.2", ready=True)
        await sink.wait_addresses({"127.0.0.2:8000"})
        up.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await admin.set_pod_status(ns, "flap", "127.0.0.2", ready=False)
        await sink.wait_addresses(set())
        down.append(time.perf_counter() - t0)
    print(f"\nready->endpoint p50 {statistics.median(up) * 1e3:.1f} ms max {max(up) * 1e3:.1f} ms; "
          f"notready->gone p50 {statistics.median(down) * 1e3:.1f} ms max {max(down) * 1e3:.1f} ms")
    assert max(up) < 2.0 and max(down) < 2.0
