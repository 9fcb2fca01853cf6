"""Two ``epp serve --ha-enable-leader-election`` processes on one pool: one serves, the other takes over.

Both run as manifests/epp/rbac.yaml's ServiceAccount (a TokenRequest token in a kubeconfig),
both watch the pool (warm standby: both ready lines count its endpoint), and only the Lease
holder reports gRPC health ``readiness`` SERVING; ``liveness`` is SERVING on both.  A killed
leader is replaced once its Lease has gone unrenewed for the lease duration; a leader stopped
with SIGTERM releases the Lease and the standby takes it at its next retry.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tools.kube.admin import V1, Admin
from tools.kube.cluster import KubeCluster

from .kube_support import NOT_SERVING, SERVING, Health, epp_credentials, start_kube_serve, v1_pool
from support.serve import Serving

APP = {"app": "vllm"}
LEASE_S, RENEW_S, RETRY_S = 2.0, 1.5, 0.2
HA = ("--ha-enable-leader-election", "--lease-duration", f"{LEASE_S}s", "--lease-renew-deadline", f"{RENEW_S}s",
      "--lease-retry-period", f"{RETRY_S}s")
JITTER = 1.2  # a candidate waits retry_period * U(1, 1.2) between attempts (client-go's jitter)
MARGIN_S = 0.5  # process scheduling on a busy 2-core machine: the health update, the Watch message
# A killed leader's last renewal is seen by the standby at most one (jittered) retry after the
# kill; the standby takes the Lease at its first attempt once that record is lease_duration old.
FAILOVER_MAX_S = LEASE_S + 2 * RETRY_S * JITTER
NO_SCRAPING = ("--refresh-metrics-interval", "0")  # nothing listens at the pod's address here


@dataclass(eq=False)
class Replica:
    """One ``epp serve`` process and a health client for it."""

    served: Serving
    health: Health


async def first_serving(replicas: list[Replica], timeout: float = 10.0) -> Replica:
    """The replica whose readiness turns SERVING first."""
    waits = {asyncio.ensure_future(r.health.wait_for(SERVING, timeout=timeout)): r for r in replicas}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        first.result()
        return waits[first]
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def test_one_of_two_replicas_serves_and_the_standby_takes_over_on_kill_and_on_sigterm(
    kube_cluster: KubeCluster, admin: Admin, namespace: str, tmp_path: Path
) -> None:
    ns = namespace
    kubeconfig = await epp_credentials(kube_cluster, admin, ns, tmp_path / "epp.kubeconfig")
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool(APP, [8000]))
    await admin.create_pod(ns, "p1", APP)
    await admin.set_pod_status(ns, "p1", "127.0.0.2", ready=True)

    replicas: list[Replica] = []

    async def start() -> Replica:
        served = await start_kube_serve(kubeconfig, ns, "pool", *HA, *NO_SCRAPING)
        replica = Replica(served, Health(served))
        replicas.append(replica)
        return replica

    try:
        async with asyncio.TaskGroup() as tg:  # a failed start cancels (and kills) the other
            starts = [tg.create_task(start()), tg.create_task(start())]
        a, b = (t.result() for t in starts)
        assert [r.served.ready["endpoints"] for r in (a, b)] == [1, 1]  # both follow the pool: warm standby
        leader = await first_serving([a, b])
        standby = b if leader is a else a
        assert [await r.health.check("liveness") for r in (leader, standby)] == [SERVING, SERVING]
        assert await standby.health.check() == NOT_SERVING

        # While the leader renews, the standby stays NOT_SERVING for longer than a lease duration.
        with pytest.raises(TimeoutError):
            await standby.health.wait_for(SERVING, timeout=LEASE_S * 1.5)
        assert [await r.health.check() for r in (leader, standby)] == [SERVING, NOT_SERVING]

        # SIGKILL: no release. The standby waits out the Lease, then serves.
        killed = time.monotonic()
        leader.served.proc.kill()
        await standby.health.wait_for(SERVING, timeout=FAILOVER_MAX_S + 2.0)
        failover = time.monotonic() - killed
        print(f"\nleader SIGKILLed: standby SERVING after {failover:.2f}s "
              f"(lease {LEASE_S}s, retry {RETRY_S}s, bound {FAILOVER_MAX_S:.2f}s)")
        assert LEASE_S - 2 * RETRY_S <= failover <= FAILOVER_MAX_S + MARGIN_S
        assert await standby.health.check("liveness") == SERVING

        # SIGTERM: the leader drains, releases the Lease, and a new standby takes it at once.
        new_leader, c = standby, await start()
        assert c.served.ready["endpoints"] == 1 and await c.health.check() == NOT_SERVING
        stopped = time.monotonic()
        new_leader.served.proc.terminate()
        await c.health.wait_for(SERVING, timeout=LEASE_S)
        handover = time.monotonic() - stopped
        print(f"leader SIGTERMed: standby SERVING after {handover:.2f}s")
        assert handover <= RETRY_S * JITTER + MARGIN_S < LEASE_S - RETRY_S  # released, not waited out
        assert await asyncio.wait_for(new_leader.served.proc.wait(), 10) == 0
    finally:
        for r in replicas:
            await r.health.aclose()
            await r.served.kill()
