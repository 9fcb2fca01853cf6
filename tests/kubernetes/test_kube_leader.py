"""Leader election on a coordination.k8s.io/v1 Lease: exclusive, hands over on death and on stop."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from tools.kube.admin import Admin

from epp.discovery._kube import call_json
from epp.discovery.leader import LeaderElector, lease_name

LEASE_S, RENEW_S, RETRY_S = 2.0, 1.5, 0.2


def elector(admin: Admin, ns: str, identity: str, leaders: list[str], **kw: object) -> LeaderElector:
    def changed(leading: bool) -> None:
        leaders.append(identity if leading else f"-{identity}")

    return LeaderElector(admin.api, namespace=ns, name=lease_name("pool", ns), identity=identity,
                         lease_duration=LEASE_S, renew_deadline=RENEW_S, retry_period=RETRY_S,
                         on_change=changed, **kw)  # type: ignore[arg-type]


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def holder(admin: Admin, ns: str) -> str | None:
    lease = await call_json(admin.coordination.read_namespaced_lease, lease_name("pool", ns), ns)
    value: str | None = lease["spec"].get("holderIdentity")
    return value


async def test_one_leader_then_failover_within_the_lease_after_a_kill(admin: Admin, namespace: str) -> None:
    ns, leaders = namespace, []
    a = elector(admin, ns, "epp-a", leaders, release_on_cancel=False)  # "killed": never releases
    b = elector(admin, ns, "epp-b", leaders)
    ta = asyncio.create_task(a.run())
    await asyncio.wait_for(a.wait_until(True), 5)
    tb = asyncio.create_task(b.run())
    try:
        # b campaigns for longer than a lease duration and never wins while a renews.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.wait_until(True), LEASE_S * 1.5)
        assert a.is_leader and not b.is_leader and await holder(admin, ns) == "epp-a"

        killed = time.monotonic()
        await stop(ta)  # the leader dies without releasing the Lease
        # A standby takes over once the Lease has gone unrenewed for its duration (seen on
        # its own clock): at most lease + two retry periods after the kill.
        await asyncio.wait_for(b.wait_until(True), LEASE_S + 2 * RETRY_S * 1.2 + 1.0)
        failover = time.monotonic() - killed
        assert failover >= LEASE_S - RETRY_S  # it did wait for the Lease to expire
        assert await holder(admin, ns) == "epp-b"
        print(f"\nleader failover after a kill: {failover:.2f}s (lease {LEASE_S}s, retry {RETRY_S}s)")
    finally:
        await stop(ta)
        await stop(tb)
    # never two at once (a's "-epp-a" is its own task ending); b released when stopped
    assert leaders == ["epp-a", "-epp-a", "epp-b", "-epp-b"]


async def test_graceful_stop_releases_and_hands_over_quickly(admin: Admin, namespace: str) -> None:
    ns, leaders = namespace, []
    a = elector(admin, ns, "epp-a", leaders)
    b = elector(admin, ns, "epp-b", leaders)
    ta = asyncio.create_task(a.run())
    await asyncio.wait_for(a.wait_until(True), 5)
    tb = asyncio.create_task(b.run())
    try:
        stopped = time.monotonic()
        await stop(ta)
        assert not a.is_leader
        # Released: b does not wait for expiry, it takes the Lease at its next retry.
        await asyncio.wait_for(b.wait_until(True), RETRY_S * 1.2 + 1.0)
        assert time.monotonic() - stopped < LEASE_S
        lease = await call_json(admin.coordination.read_namespaced_lease, lease_name("pool", ns), ns)
        assert lease["spec"]["holderIdentity"] == "epp-b" and lease["spec"]["leaseTransitions"] == 1
    finally:
        await stop(ta)
        await stop(tb)
    assert leaders == ["epp-a", "-epp-a", "epp-b", "-epp-b"]


async def test_leader_steps_down_when_it_cannot_renew(admin: Admin, namespace: str) -> None:
    """A leader whose renewals fail (here: someone else took the Lease) stops reporting leadership."""
    ns, leaders = namespace, []
    a = elector(admin, ns, "epp-a", leaders)
    ta = asyncio.create_task(a.run())
    try:
        await asyncio.wait_for(a.wait_until(True), 5)
        name = lease_name("pool", ns)
        lease = await call_json(admin.coordination.read_namespaced_lease, name, ns)
        lease["spec"]["holderIdentity"] = "intruder"
        lease["spec"]["leaseDurationSeconds"] = 60
        await call_json(admin.coordination.replace_namespaced_lease, name, ns, lease)
        await asyncio.wait_for(a.wait_until(False), RETRY_S * 1.2 + 1.0)
        assert await holder(admin, ns) == "intruder"
    finally:
        await stop(ta)
    assert leaders == ["epp-a", "-epp-a"]
