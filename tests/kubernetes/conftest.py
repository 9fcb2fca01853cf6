"""Fixtures for the Kubernetes tests: one real etcd + kube-apiserver per session, on 127.0.0.1.

* ``kube_cluster`` (session): builds/finds the binaries (``tools.kube.build``; skipped only
  when there is no Go toolchain or no way to get etcd), starts the cluster
  (``tools.kube.cluster``), installs the CRDs every test may use.  The llm-d.ai
  InferenceObjective CRD is *not* installed: the test of a CRD installed later does that,
  and removes it again.
* ``admin``: a kubernetes_asyncio client as the cluster admin, wrapped in ``tools.kube.admin.Admin``.
* ``namespace``: a fresh namespace per test (never deleted: no namespace controller runs,
  and the cluster dies with the session).
* ``sink`` / ``sources``: a recording :class:`~epp.discovery.PoolSink`, and running
  :class:`~epp.discovery.kubernetes.KubernetesPoolSource`\\ s with short timings.

Tests wait on what the sink received (``await sink.wait_for(predicate)``), never on time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections.abc import AsyncIterator, Awaitable, Iterator

import pytest
from tools.kube.admin import Admin
from tools.kube.build import ToolMissing, ensure_etcd, ensure_kube_apiserver
from tools.kube.cluster import KubeCluster

from epp.discovery._kube import close_api_client, new_api_client

from .kube_support import RecordingSink, Sources

BASE_CRDS = (
    "inferencepools.inference.networking.k8s.io",
    "inferencepools.inference.networking.x-k8s.io",
    "inferencemodels.inference.networking.x-k8s.io",
    "inferenceobjectives.inference.networking.x-k8s.io",
)


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    try:
        etcd = ensure_etcd()
        apiserver = ensure_kube_apiserver()
    except ToolMissing as exc:
        pytest.skip(f"no Kubernetes test tools: {exc}")
    cluster = KubeCluster(tmp_path_factory.mktemp("kube"), apiserver, etcd).start()
    try:
        _in_fresh_loop(_install(cluster, BASE_CRDS))
        yield cluster
    finally:
        cluster.stop()


def _in_fresh_loop(coro: Awaitable[None]) -> None:
    """Run a coroutine to completion on its own loop in a worker thread (session set-up)."""
    async def main() -> None:
        await coro

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, main()).result()




async def _install(cluster: KubeCluster, crds: tuple[str, ...]) -> None:
    api = await new_api_client(str(cluster.kubeconfig))
    try:
        admin = Admin(api)
        await asyncio.gather(*(admin.install_crd(name) for name in crds))
    finally:
        await close_api_client(api)


@pytest.fixture
async def admin(kube_cluster: KubeCluster) -> AsyncIterator[Admin]:
    api = await new_api_client(str(kube_cluster.kubeconfig))
    try:
        yield Admin(api)
    finally:
        await close_api_client(api)


_namespaces = itertools.count()


@pytest.fixture
async def namespace(admin: Admin, request: pytest.FixtureRequest) -> str:
    stem = request.node.name.replace("_", "-").lower()[:40].strip("-")
    name = f"{stem}-{next(_namespaces)}"
    await admin.create_namespace(name)
    return name


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
async def sources(admin: Admin, namespace: str, sink: RecordingSink) -> AsyncIterator[Sources]:
    runner = Sources(admin, namespace, sink)
    try:
        yield runner
    finally:
        await runner.aclose()
