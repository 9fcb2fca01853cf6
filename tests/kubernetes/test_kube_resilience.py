"""Watches survive what real API servers do: 410 Gone, and the API server restarting (under a
running source, and under `epp serve`)."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from tools.kube.admin import V1, Admin
from tools.kube.cluster import KubeCluster

from epp.discovery._kube import ApiException, Reflector, WatchTiming

from .kube_support import SERVING, WAIT_S, Health, Sources, epp_credentials, start_kube_serve, v1_pool
from support.messages import ExtProcClient, request_headers, set_headers

APP = {"app": "vllm"}


async def test_stale_resource_version_is_410_and_relists(admin: Admin, namespace: str, sources: Sources) -> None:
    """A watch from a resourceVersion the server no longer has gets 410 Gone; the source re-lists."""
    ns, sink = namespace, sources.sink
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool(APP, [8000]))
    await admin.create_pod(ns, "p1", APP)
    await admin.set_pod_status(ns, "p1", "127.0.0.2", ready=True)
    source = await sources.start(run=False)  # listed, not yet watching
    pool = source._pool_obj
    assert pool is not None and pool.lists == 1 and sink.addresses() == {"127.0.0.2:8000"}

    # The server really answers 410 Gone for this version: its watch cache for the pool CRD
    # starts at the version the CRD was installed at, far beyond 2.
    probe = Reflector("probe", functools.partial(admin.custom.list_namespaced_custom_object, *V1, ns,
                                                 "inferencepools"), on_change=lambda: None, timing=WatchTiming())
    probe.resource_version = "2"
    with pytest.raises(ApiException) as gone:
        await asyncio.wait_for(probe._watch(), 10)
    assert gone.value.status == 410

    # A change the source cannot see through a watch from the stale version...
    await admin.patch(V1, "inferencepools", ns, "pool", {"targetPorts": [{"number": 8001}]})
    pool.resource_version = "2"
    sources.spawn(source)
    # ...arrives through the re-list that the 410 triggers,
    await sink.wait_addresses({"127.0.0.2:8001"})
    assert pool.lists == 2
    # and the watch goes on from the re-list's version.
    await admin.patch(V1, "inferencepools", ns, "pool", {"targetPorts": [{"number": 8002}]})
    await sink.wait_addresses({"127.0.0.2:8002"})
    assert pool.lists == 2


async def test_apiserver_restart_under_a_running_source(kube_cluster: KubeCluster, admin: Admin, namespace: str,
                                                        sources: Sources) -> None:
    ns, sink = namespace, sources.sink
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool(APP, [8000]))
    await admin.create_pod(ns, "p1", APP)
    await admin.create_pod(ns, "p2", APP)
    await admin.set_pod_status(ns, "p1", "127.0.0.2", ready=True)
    await sources.start()
    await sink.wait_addresses({"127.0.0.2:8000"})
    writes = len(sink.pools)

    # Changed just before the restart: must not be lost whichever way the watch learns of it.
    await admin.set_pod_status(ns, "p2", "127.0.0.3", ready=True)
    took = await asyncio.to_thread(kube_cluster.restart_apiserver)
    restarted = time.monotonic()
    await sink.wait_addresses({"127.0.0.2:8000", "127.0.0.3:8000"})
    assert sink.pool is not None and None not in sink.pools[writes:]  # the pool stayed known throughout

    # The watches resumed: a change after the restart arrives.
    await admin.set_pod_status(ns, "p1", "127.0.0.2", ready=False)
    await sink.wait_addresses({"127.0.0.3:8000"})
    resumed = time.monotonic() - restarted
    await admin.patch(V1, "inferencepools", ns, "pool", {"targetPorts": [{"number": 8001}]})
    await sink.wait_addresses({"127.0.0.3:8001"})
    print(f"\napiserver restart {took:.1f}s; a change made once it was ready reached the sink {resumed:.2f}s later")


async def test_epp_serve_stays_ready_and_routing_through_an_apiserver_restart(
        kube_cluster: KubeCluster, admin: Admin, namespace: str, tmp_path: Path) -> None:
    # The source-level test above, now as `epp serve`: readiness never drops while the API
    # server is away, ext_proc keeps routing to the pods it knows, and a pod that becomes
    # ready after the restart is routed to.
    ns = namespace
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool(APP, [8000]))
    await admin.create_pod(ns, "p1", APP)
    await admin.set_pod_status(ns, "p1", "127.0.0.2", ready=True)
    kubeconfig = await epp_credentials(kube_cluster, admin, ns, tmp_path / "kubeconfig")
    served = await start_kube_serve(kubeconfig, ns, "pool", "--refresh-metrics-interval", "0",
                                    "--scheduling-profile", "round-robin")
    health = Health(served)
    statuses: list[int] = []

    async def follow() -> None:
        async for answer in health.stub.Watch(health_pb2.HealthCheckRequest(service="readiness")):
            statuses.append(answer.status)

    async def picks(n: int) -> set[str]:
        async with grpc.aio.insecure_channel(served.address("grpc")) as ch:
            client = ExtProcClient(ch)
            return {set_headers((await client.run([request_headers(method="GET", end_of_stream=True)]))[0])
                    ["x-gateway-destination-endpoint"] for _ in range(n)}

    watcher = asyncio.create_task(follow())
    try:
        assert served.ready["endpoints"] == 1
        await asyncio.to_thread(kube_cluster.restart_apiserver)
        assert await picks(2) == {"127.0.0.2:8000"}
        await admin.create_pod(ns, "p2", APP)
        await admin.set_pod_status(ns, "p2", "127.0.0.3", ready=True)
        async with asyncio.timeout(WAIT_S):  # bounded poll: epp serve offers nothing to await
            while True:
                if await picks(2) == {"127.0.0.2:8000", "127.0.0.3:8000"}:  # round-robin: both
                    break
                await asyncio.sleep(0.05)
        assert statuses and set(statuses) == {SERVING}  # never NOT_SERVING, restart included
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await health.aclose()
        assert await served.stop() == 0
