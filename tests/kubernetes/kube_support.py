"""Helpers of the Kubernetes tests: a recording sink, running sources, pool specs, timings,
epp's own RBAC (manifests/epp/rbac.yaml) and credentials bound to it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tools.kube.admin import Admin
from tools.kube.cluster import KubeCluster

from epp.discovery._kube import WatchTiming
from epp.discovery.kubernetes import KubernetesPoolSource
from epp.domain import ModelPolicies, Pool

from support.serve import Serving, start_epp_serve

# The Role, ServiceAccount and RoleBinding epp runs as: the manifests' own, read once at import.
EPP_RBAC_FILE = Path(__file__).resolve().parents[2] / "manifests" / "epp" / "rbac.yaml"
EPP_RBAC = EPP_RBAC_FILE.read_text()
_RBAC_NAMES = {d["kind"]: d["metadata"]["name"] for d in yaml.safe_load_all(EPP_RBAC)}
EPP_ACCOUNT, EPP_BINDING = _RBAC_NAMES["ServiceAccount"], _RBAC_NAMES["RoleBinding"]

# Short enough that a test sees reconnects, re-checks and backoff resolve in well under a second.
FAST = WatchTiming(watch_timeout=30.0, request_timeout=5.0, backoff=0.05, max_backoff=0.5, recheck_interval=0.2,
                   absent_grace=0.5)
WAIT_S = 10.0  # deadline for any single expected change


class RecordingSink:
    """A PoolSink that keeps every value it was given and lets tests wait for a condition."""

    def __init__(self) -> None:
        self.pools: list[Pool | None] = []
        self.policies_seen: list[ModelPolicies] = []
        self._changed = asyncio.Event()

    @property
    def pool(self) -> Pool | None:
        return self.pools[-1] if self.pools else None

    @property
    def policies(self) -> ModelPolicies:
        return self.policies_seen[-1] if self.policies_seen else ModelPolicies()

    def addresses(self) -> set[str]:
        return {e.address for e in self.pool.endpoints} if self.pool is not None else set()

    def set_pool(self, pool: Pool | None) -> None:
        self.pools.append(pool)
        self._changed.set()

    def set_mirror(self, pool: Pool | None) -> None:
        raise AssertionError("Kubernetes discovery has no mirror pool")

    def set_policies(self, policies: ModelPolicies) -> None:
        self.policies_seen.append(policies)
        self._changed.set()

    def apply(self, pool: Pool | None, mirror: Pool | None, policies: ModelPolicies) -> None:
        self.set_pool(pool)
        self.set_policies(policies)

    async def wait_for(self, predicate: Callable[[RecordingSink], bool], timeout: float = WAIT_S,
                       what: str = "condition") -> None:
        """Return once ``predicate(self)`` holds after some write; fail after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"{what} not reached in {timeout}s; last pool {self.pool!r}, "
                                 f"policies {self.policies!r}") from None

    async def wait_addresses(self, expected: set[str], timeout: float = WAIT_S) -> None:
        await self.wait_for(lambda s: s.pool is not None and s.addresses() == expected, timeout,
                            what=f"endpoints {sorted(expected)}")


class Sources:
    """Starts sources (sync, then ``run()`` in a task) for one test's namespace; stops them all."""

    def __init__(self, admin: Admin, namespace: str, sink: RecordingSink) -> None:
        self.admin = admin
        self.namespace = namespace
        self.sink = sink
        self._sources: list[KubernetesPoolSource] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, pool_name: str = "pool", *, group: str = "inference.networking.k8s.io",
                    api_client: Any = None, into: RecordingSink | None = None, timing: WatchTiming = FAST,
                    run: bool = True, **kw: Any) -> KubernetesPoolSource:
        if api_client is None and "kubeconfig" not in kw:
            api_client = self.admin.api  # else the source makes (and closes) its own client
        source = KubernetesPoolSource(
            into or self.sink, pool_name=pool_name, namespace=self.namespace, group=group,
            api_client=api_client, timing=timing, **kw,
        )
        self._sources.append(source)
        await source.sync()
        if run:
            self.spawn(source)
        return source

    def spawn(self, source: KubernetesPoolSource) -> asyncio.Task[None]:
        task = asyncio.create_task(source.run(), name=f"source-{source.pool_name}")
        self._tasks.append(task)
        return task

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for source in self._sources:
            await source.aclose()


def v1_pool(selector: dict[str, str], ports: list[int], failure_mode: str = "FailClose") -> dict[str, Any]:
    return {
        "selector": {"matchLabels": selector},
        "targetPorts": [{"number": p} for p in ports],
        "endpointPickerRef": {"name": "epp", "port": {"number": 9002}, "failureMode": failure_mode},
    }


async def epp_credentials(cluster: KubeCluster, admin: Admin, ns: str, path: Path) -> Path:
    """Apply manifests/epp/rbac.yaml in ``ns`` and write a kubeconfig with a bound token of its ServiceAccount."""
    await admin.apply_rbac(ns, EPP_RBAC)
    token = await admin.service_account_token(ns, EPP_ACCOUNT)
    return await asyncio.to_thread(cluster.write_kubeconfig, path, token, EPP_ACCOUNT)


# ---- `epp serve` in Kubernetes mode, as a process ------------------------------------------
async def start_kube_serve(kubeconfig: Path, namespace: str, pool: str, *extra: str,
                           timeout: float = 30.0) -> Serving:
    """``epp serve --pool-name POOL --kubeconfig …``, every port 0 on 127.0.0.1, plaintext; up to its ready line."""
    return await start_epp_serve("--pool-name", pool, "--pool-namespace", namespace, "--kubeconfig", str(kubeconfig),
                                 "--secure-serving=false", *extra, timeout=timeout)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """gRPC health of one ``epp serve``: ``check`` once, or ``wait_for`` a status on a Watch stream."""

    def __init__(self, served: Serving) -> None:
        self.channel = grpc.aio.insecure_channel(served.address("health"))
        self.stub = health_pb2_grpc.HealthStub(self.channel)

    async def check(self, service: str = "readiness") -> int:
        answer = await self.stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        status: int = answer.status
        return status

    async def wait_for(self, status: int, service: str = "readiness", timeout: float = WAIT_S) -> None:
        """Return once ``service`` reports ``status`` (the Watch stream's first message is the current one)."""
        call = self.stub.Watch(health_pb2.HealthCheckRequest(service=service))
        try:
            async with asyncio.timeout(timeout):
                async for answer in call:
                    if answer.status == status:
                        return
        finally:
            call.cancel()

    async def aclose(self) -> None:
        await self.channel.close()
