"""HA leader election: one ``coordination.k8s.io/v1`` Lease per pool, client-go's algorithm.

Every replica runs a :class:`LeaderElector`; the one holding the Lease is the leader (only
it reports readiness SERVING; all replicas keep watching and scraping as warm standbys).

* Every ``retry_period`` a candidate reads the Lease.  It takes the Lease when there is none,
  when it is released (no holder), or when its record has not changed for the Lease's own
  ``leaseDurationSeconds`` *as measured on this replica's clock* since it was first seen
  (client-go's rule: no comparison of wall clocks across machines, so clock skew is harmless).
  Writes carry the read ``resourceVersion``: of two candidates, one wins and the other gets
  409 Conflict.
* The leader renews every ``retry_period``; when no renewal succeeded for ``renew_deadline``
  it steps down (before the Lease can expire for the others, since renew_deadline < lease_duration).
* Cancelling :meth:`LeaderElector.run` releases a held Lease (holder cleared, duration 1 s)
  unless ``release_on_cancel`` is False, so a graceful stop hands over within ``retry_period``.
  A killed leader is replaced within ``lease_duration`` plus up to two ``retry_period``\\ s
  after its last renewal was seen.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client as k8s_client

from epp.discovery._kube import TRANSIENT, ApiException, Obj, call_json

log = logging.getLogger(__name__)


def lease_name(pool_name: str, namespace: str) -> str:
    """The Lease of a pool's epp replicas: the Go EPP's name, so both kinds never lead at once."""
    return f"epp-{namespace}-{pool_name}.gateway-api-inference-extension.sigs.k8s.io"


def default_identity() -> str:
    """``<hostname>_<random>``, as client-go builds it (the hostname is the pod name in a cluster)."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:12]}"


def _micro_time(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaigns for one Lease; :attr:`is_leader` says whether this replica holds it."""

    def __init__(
        self,
        api_client: Any,
        *,
        namespace: str,
        name: str,
        identity: str | None = None,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        release_on_cancel: bool = True,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError("leader election needs 0 < retry_period < renew_deadline < lease_duration")
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.release_on_cancel = release_on_cancel
        self.transitions = 0  # times this replica became leader
        self._on_change = on_change
        self._clock = clock
        self._api = k8s_client.CoordinationV1Api(api_client)
        self._leader = False
        self._leading = asyncio.Event()
        self._following = asyncio.Event()
        self._following.set()
        self._observed: Obj | None = None  # the last Lease spec read
        self._observed_at = 0.0  # when it last changed, on our clock
        self._renewed_at = 0.0
        self._failures = 0

    @property
    def is_leader(self) -> bool:
        return self._leader

    async def wait_until(self, leader: bool) -> None:
        """Return once :attr:`is_leader` equals ``leader``."""
        await (self._leading if leader else self._following).wait()

    async def run(self) -> None:
        """Campaign, then renew, until cancelled; a held Lease is released on cancel."""
        try:
            while True:
                # An attempt never outlives the renew deadline: a leader must be able to step
                # down on time even when the API server hangs instead of failing.
                started = self._clock()
                budget = self.renew_deadline
                if self._leader:
                    budget = max(budget - (started - self._renewed_at), self.retry_period / 2)
                leading = await self._try_acquire_or_renew(budget)
                now = self._clock()
                if leading:
                    self._renewed_at = started  # the Lease counts from before the write, to be safe
                    self._set(True)
                elif self._leader and (now - self._renewed_at > self.renew_deadline or self._lost()):
                    log.warning("lease %s: lost leadership (no renewal for %.1fs or taken over)",
                                self.name, now - self._renewed_at)
                    self._set(False)
                delay = self.retry_period if self._leader else self.retry_period * random.uniform(1.0, 1.2)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            if self._leader and self.release_on_cancel:
                await self._release()
            self._set(False)
            raise

    # ---- the algorithm --------------------------------------------------------------------
    def _desired(self, now: datetime, old: Obj | None) -> Obj:
        mine = old is not None and old.get("holderIdentity") == self.identity
        transitions = int((old or {}).get("leaseTransitions") or 0)
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": math.ceil(self.lease_duration),
            "acquireTime": (old or {}).get("acquireTime") if mine else _micro_time(now),
            "renewTime": _micro_time(now),
            "leaseTransitions": transitions if mine or old is None else transitions + 1,
        }

    def _lost(self) -> bool:
        """The last read shows someone else holding the Lease."""
        holder = (self._observed or {}).get("holderIdentity")
        return bool(holder) and holder != self.identity

    async def _try_acquire_or_renew(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                return await self._attempt()
        except ApiException as exc:
            if exc.status != 409:  # a conflict is simply losing a race
                self._log_failure(f"{exc.status} {exc.reason}")
        except TRANSIENT as exc:
            self._log_failure(type(exc).__name__)
        return False

    async def _attempt(self) -> bool:
        """One read and, if the Lease is ours to take or renew, one write; raises on API errors."""
        now = datetime.now(UTC)
        try:
            lease = await call_json(self._api.read_namespaced_lease, self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": self.name, "namespace": self.namespace}, "spec": self._desired(now, None)}
            await call_json(self._api.create_namespaced_lease, self.namespace, body)
            self._observe(body["spec"])
            self._failures = 0
            return True
        spec = lease.get("spec") or {}
        self._observe(spec)
        holder = spec.get("holderIdentity")
        if holder and holder != self.identity:
            duration = float(spec.get("leaseDurationSeconds") or math.ceil(self.lease_duration))
            if self._clock() < self._observed_at + duration:
                return False  # held, and renewed within its duration as far as we can tell
        lease["spec"] = self._desired(now, spec)
        await call_json(self._api.replace_namespaced_lease, self.name, self.namespace, lease)
        self._observe(lease["spec"])
        self._failures = 0
        return True

    def _observe(self, spec: Obj) -> None:
        if spec != self._observed:
            self._observed = dict(spec)
            self._observed_at = self._clock()

    async def _release(self) -> None:
        """Clear the holder so a standby takes over at its next retry (best effort, bounded)."""
        try:
            # a read and a write: allow more than one retry period, but stay well inside the renew deadline
            async with asyncio.timeout(max(self.retry_period, self.renew_deadline / 2)):
                lease = await call_json(self._api.read_namespaced_lease, self.name, self.namespace)
                spec = lease.get("spec") or {}
                if spec.get("holderIdentity") != self.identity:
                    return
                now = _micro_time(datetime.now(UTC))
                lease["spec"] = {**spec, "holderIdentity": None, "leaseDurationSeconds": 1,
                                 "acquireTime": now, "renewTime": now}
                await call_json(self._api.replace_namespaced_lease, self.name, self.namespace, lease)
                log.info("lease %s: released by %s", self.name, self.identity)
        except (ApiException, *TRANSIENT) as exc:
            log.warning("lease %s: release failed (%s); it expires in %.0fs", self.name, exc, self.lease_duration)

    def _set(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        if leader:
            self.transitions += 1
            self._following.clear()
            self._leading.set()
            log.info("lease %s: %s is now the leader", self.name, self.identity)
        else:
            self._leading.clear()
            self._following.set()
        if self._on_change is not None:
            self._on_change(leader)

    def _log_failure(self, what: str) -> None:
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(level, "lease %s: attempt failed: %s (%d in a row)", self.name, what, self._failures)


__all__ = ["LeaderElector", "default_identity", "lease_name"]
