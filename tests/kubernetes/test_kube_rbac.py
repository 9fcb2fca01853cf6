"""epp as the ServiceAccount bound to manifests/epp/rbac.yaml's Role: enough, and nothing more."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kubernetes_asyncio import client
from tools.kube.admin import V1, V1ALPHA2, Admin
from tools.kube.cluster import KubeCluster

from epp.discovery._kube import ApiException, call_json, new_api_client
from epp.discovery.leader import LeaderElector, lease_name

from .kube_support import EPP_ACCOUNT, EPP_BINDING, EPP_RBAC, Sources, epp_credentials, v1_pool
from support import EPP_RBAC_RULES

APP = {"app": "vllm"}


def mount_service_account(d: Path, token: str, ca: Path) -> Path:
    """What the kubelet projects into a pod: the token and the cluster CA."""
    d.mkdir()
    (d / "token").write_text(token)
    (d / "ca.crt").write_bytes(ca.read_bytes())
    return d


async def test_source_and_leader_election_work_with_only_the_role(
    kube_cluster: KubeCluster, admin: Admin, namespace: str, sources: Sources, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """epp as a pod would run it: in-cluster config, a bound ServiceAccount token, the Role alone."""
    ns, sink = namespace, sources.sink
    await admin.apply_rbac(ns, EPP_RBAC)
    token = await admin.service_account_token(ns, EPP_ACCOUNT)
    sa_dir = await asyncio.to_thread(mount_service_account, tmp_path / "sa", token, kube_cluster.ca_file)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube_cluster.port))
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool(APP, [8000]))
    await admin.create(V1ALPHA2, "inferenceobjectives", ns, "premium", {"priority": 2, "poolRef": {"name": "pool"}})
    await admin.create_pod(ns, "p1", APP)
    await admin.set_pod_status(ns, "p1", "127.0.0.2", ready=True)

    epp_api = await new_api_client(None, service_account_dir=str(sa_dir))
    try:
        source = await sources.start(api_client=epp_api)
        await sink.wait_addresses({"127.0.0.2:8000"})
        assert dict(sink.policies.objectives) == {"premium": 2}
        # Every collection listed with the Role alone (the llm-d.ai CRD is simply not installed).
        assert source._models is not None and source._models.available is True
        assert source._objectives["inference.networking.x-k8s.io"].available is True

        elector = LeaderElector(epp_api, namespace=ns, name=lease_name("pool", ns), identity="epp-0",
                                lease_duration=2.0, renew_deadline=1.5, retry_period=0.2)
        task = asyncio.create_task(elector.run())
        try:
            await asyncio.wait_for(elector.wait_until(True), 5)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        lease = await call_json(admin.coordination.read_namespaced_lease, lease_name("pool", ns), ns)
        assert not lease["spec"].get("holderIdentity")  # released with the Role's update verb

        # Anything outside the Role is refused.
        core = client.CoreV1Api(epp_api)
        refused = [
            core.list_namespaced_secret(ns),
            core.create_namespaced_pod(ns, {"metadata": {"name": "x"},
                                            "spec": {"containers": [{"name": "c", "image": "i"}]}}),
            core.patch_namespaced_pod_status("p1", ns, {"status": {"podIP": "127.0.0.9"}}),
            core.list_namespaced_pod("default"),
            client.CoordinationV1Api(epp_api).delete_namespaced_lease(lease_name("pool", ns), ns),
            client.CustomObjectsApi(epp_api).delete_namespaced_custom_object(
                "inference.networking.k8s.io", "v1", ns, "inferencepools", "pool"),
        ]
        for call in refused:
            with pytest.raises(ApiException) as err:
                await call
            assert err.value.status == 403
    finally:
        await epp_api.close()


async def test_leader_steps_down_when_renewals_fail_for_the_renew_deadline(
    kube_cluster: KubeCluster, admin: Admin, namespace: str, tmp_path: Path
) -> None:
    """Revoking the Role makes every renewal fail (403): the leader steps down after renew_deadline, not before."""
    ns = namespace
    kubeconfig = await epp_credentials(kube_cluster, admin, ns, tmp_path / "epp.kubeconfig")
    epp_api = await new_api_client(str(kubeconfig))
    renew_deadline, retry = 1.0, 0.1
    elector = LeaderElector(epp_api, namespace=ns, name=lease_name("pool", ns), identity="epp-0",
                            lease_duration=2.0, renew_deadline=renew_deadline, retry_period=retry)
    task = asyncio.create_task(elector.run())
    try:
        await asyncio.wait_for(elector.wait_until(True), 5)
        await call_json(admin.rbac.delete_namespaced_role_binding, EPP_BINDING, ns)
        revoked = loop_time()
        await asyncio.wait_for(elector.wait_until(False), renew_deadline + 1.0)
        stepped_down = loop_time() - revoked
        assert renew_deadline - retry <= stepped_down <= renew_deadline + 0.5
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await epp_api.close()


def loop_time() -> float:
    return asyncio.get_running_loop().time()


GRANTED = EPP_RBAC_RULES
ASKED = [*GRANTED, ("", "pods/status"), ("", "secrets"), ("", "configmaps"), ("", "services"),
         ("apps", "deployments"), ("inference.networking.k8s.io", "inferencepools/status"),
         ("rbac.authorization.k8s.io", "roles")]
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")


async def test_the_authorizer_grants_the_role_exactly(
    kube_cluster: KubeCluster, admin: Admin, namespace: str, tmp_path: Path
) -> None:
    """The API server's own answer, per resource and verb, as epp's ServiceAccount: granted ⇔ in GRANTED."""
    ns = namespace
    kubeconfig = await epp_credentials(kube_cluster, admin, ns, tmp_path / "epp.kubeconfig")
    epp_api = await new_api_client(str(kubeconfig))
    authz = client.AuthorizationV1Api(epp_api)

    async def allowed(group: str, resource: str, verb: str, where: str = ns) -> bool:
        plural, _, sub = resource.partition("/")
        attrs = {"namespace": where, "group": group, "resource": plural, "subresource": sub, "verb": verb}
        review = await call_json(authz.create_self_subject_access_review, {"spec": {"resourceAttributes": attrs}})
        return bool(review["status"].get("allowed"))

    try:
        cells = [(g, r, v) for g, r in ASKED for v in VERBS]
        answers = await asyncio.gather(*(allowed(g, r, v) for g, r, v in cells))
        granted = {(g, r, v) for (g, r, v), yes in zip(cells, answers, strict=True) if yes}
        assert granted == {(g, r, v) for (g, r), verbs in GRANTED.items() for v in verbs}
        assert not await allowed("", "pods", "list", "default")  # a Role: nothing outside its namespace
    finally:
        await epp_api.close()
