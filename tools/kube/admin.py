"""What tests and benchmarks do to the API server as its admin: namespaces, pods (and their
status), pools, model objects, CRDs, RBAC, ServiceAccount tokens.  Every helper returns the
server's JSON.

There is no kubelet: a pod gets its IP and ``Ready`` condition from :meth:`Admin.set_pod_status`
(the ``status`` subresource), and with no ``nodeName`` a deleted pod is removed at once.
Pod IPs are loopback addresses only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.watch import Watch

from epp.discovery._kube import call_json

CRD_DIR = Path(__file__).parent / "crds"  # written by this project from the published API fields
MERGE = "application/merge-patch+json"
V1 = ("inference.networking.k8s.io", "v1")
V1ALPHA2 = ("inference.networking.x-k8s.io", "v1alpha2")
LLMD = ("llm-d.ai", "v1alpha2")


# Read once at import: no file I/O on the event loop.
CRDS: dict[str, str] = {p.stem: p.read_text() for p in CRD_DIR.glob("*.yaml")}


def crd_doc(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(CRDS[name])
    return doc


class Admin:
    def __init__(self, api: Any) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.ext = client.ApiextensionsV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.coordination = client.CoordinationV1Api(api)

    # ---- namespaces and pods -----------------------------------------------------------
    async def create_namespace(self, name: str) -> None:
        await call_json(self.core.create_namespace, {"metadata": {"name": name}})

    async def create_pod(self, ns: str, name: str, labels: dict[str, str], *,
                         annotations: dict[str, str] | None = None, finalizers: list[str] | None = None) -> Any:
        body = {
            "metadata": {"name": name, "labels": labels, "annotations": annotations or {},
                         "finalizers": finalizers or []},
            "spec": {"containers": [{"name": "model-server", "image": "epp-sim:test"}]},
        }
        return await call_json(self.core.create_namespaced_pod, ns, body)

    async def set_pod_status(self, ns: str, name: str, ip: str | None, ready: bool) -> Any:
        assert ip is None or ip.startswith("127."), "pod IPs in tests are loopback addresses only"
        status: dict[str, Any] = {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "podIP": ip,
            "podIPs": [{"ip": ip}] if ip else None,
        }
        return await call_json(self.core.patch_namespaced_pod_status, name, ns, {"status": status},
                               _content_type=MERGE)

    async def patch_pod(self, ns: str, name: str, patch: dict[str, Any]) -> Any:
        return await call_json(self.core.patch_namespaced_pod, name, ns, patch, _content_type=MERGE)

    async def delete_pod(self, ns: str, name: str) -> Any:
        return await call_json(self.core.delete_namespaced_pod, name, ns)

    # ---- custom objects ------------------------------------------------------------------
    async def create(self, gv: tuple[str, str], plural: str, ns: str, name: str, spec: dict[str, Any]) -> Any:
        kinds = {"inferencepools": "InferencePool", "inferencemodels": "InferenceModel",
                 "inferenceobjectives": "InferenceObjective"}
        body = {"apiVersion": f"{gv[0]}/{gv[1]}", "kind": kinds[plural], "metadata": {"name": name}, "spec": spec}
        return await call_json(self.custom.create_namespaced_custom_object, gv[0], gv[1], ns, plural, body)

    async def patch(self, gv: tuple[str, str], plural: str, ns: str, name: str, spec: dict[str, Any]) -> Any:
        return await call_json(self.custom.patch_namespaced_custom_object, gv[0], gv[1], ns, plural, name,
                               {"spec": spec}, _content_type=MERGE)

    async def delete(self, gv: tuple[str, str], plural: str, ns: str, name: str) -> Any:
        return await call_json(self.custom.delete_namespaced_custom_object, gv[0], gv[1], ns, plural, name)

    # ---- CRDs ------------------------------------------------------------------------------
    async def install_crd(self, name: str, timeout: float = 20.0) -> None:
        """Create a CRD from ``crds/`` and wait (on a watch) until it is Established."""
        doc = crd_doc(name)
        try:
            await call_json(self.ext.create_custom_resource_definition, doc)
        except ApiException as exc:
            if exc.status != 409:
                raise
        await self._wait_crd(doc["metadata"]["name"], _established, timeout)

    async def delete_crd(self, name: str, timeout: float = 20.0) -> None:
        """Delete a CRD and wait until it is gone (the API server removes its objects first)."""
        crd = crd_doc(name)["metadata"]["name"]
        try:
            await call_json(self.ext.delete_custom_resource_definition, crd)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        await self._wait_crd(crd, lambda obj: obj is None, timeout)

    async def _wait_crd(self, name: str, done: Any, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while True:
                listed = await call_json(self.ext.list_custom_resource_definition,
                                         field_selector=f"metadata.name={name}")
                items = listed.get("items") or []
                if done(items[0] if items else None):
                    return
                async with Watch(return_type="object") as watch:
                    stream = watch.stream(self.ext.list_custom_resource_definition,
                                          field_selector=f"metadata.name={name}",
                                          resource_version=listed["metadata"]["resourceVersion"], timeout_seconds=30)
                    async for event in stream:
                        obj = None if event["type"] == "DELETED" else event["raw_object"]
                        if event["type"] != "BOOKMARK" and done(obj):
                            return

    # ---- RBAC ------------------------------------------------------------------------------
    async def apply_rbac(self, ns: str, text: str) -> None:
        """Create the ServiceAccount, Role and RoleBinding of ``text`` (e.g. manifests/epp/rbac.yaml) in ``ns``.

        Every subject of a RoleBinding is moved to ``ns`` as well.
        """
        for doc in yaml.safe_load_all(text):
            doc["metadata"]["namespace"] = ns
            kind = doc["kind"]
            if kind == "ServiceAccount":
                await call_json(self.core.create_namespaced_service_account, ns, doc)
            elif kind == "Role":
                await call_json(self.rbac.create_namespaced_role, ns, doc)
            elif kind == "RoleBinding":
                for subject in doc["subjects"]:
                    subject["namespace"] = ns
                await call_json(self.rbac.create_namespaced_role_binding, ns, doc)

    async def service_account_token(self, ns: str, name: str, seconds: int = 3600) -> str:
        """A bound token for the ServiceAccount, from the TokenRequest API."""
        answer = await call_json(self.core.create_namespaced_service_account_token, name, ns,
                                 {"spec": {"expirationSeconds": seconds}})
        token: str = answer["status"]["token"]
        return token


def _established(obj: dict[str, Any] | None) -> bool:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []  # null until the server sets them
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)
