"""Kubernetes discovery: the InferencePool, its Pods and its model objects, from the API server.

:class:`KubernetesPoolSource` mirrors, in the pool's namespace, with list + watch:

* the one ``InferencePool`` (field selector on its name).  v1 (``inference.networking.k8s.io``):
  ``spec.selector.matchLabels``, ``spec.targetPorts[].number``, ``spec.endpointPickerRef.failureMode``;
  v1alpha2 (``inference.networking.x-k8s.io``): ``spec.selector``, ``spec.targetPortNumber``,
  ``spec.extensionRef.failureMode``;
* the Pods matching the pool's selector (a label-selector watch, restarted when the selector
  changes; until the new list arrives the old pods are filtered by the new selector locally);
* ``InferenceModel`` (``inference.networking.x-k8s.io/v1alpha2``) and ``InferenceObjective``
  (``llm-d.ai/v1alpha2``, else ``inference.networking.x-k8s.io/v1alpha2``) whose ``poolRef``
  names this pool; each is optional: an absent CRD is one log line and re-checked.

and writes to the sink:

* ``set_pool(None)`` while the pool does not exist (or its CRD is absent, or the pods of its
  selector have not been listed yet): readiness is NOT_SERVING without a complete view;
* otherwise a :class:`~epp.domain.Pool` whose endpoints are the pods with a ``podIP``, condition
  ``Ready=True`` and no ``deletionTimestamp``, times the target ports (restricted by the pod
  annotation ``inference.networking.k8s.io/active-ports`` when present).  Endpoint names: the
  pod's name with one target port; ``<pod>-rank-<i>`` (``i`` = the port's index in the pool's
  target ports, GIE's data-parallel naming) with several.  Endpoint labels: the pod's labels
  (so ``inference.networking.k8s.io/engine-type`` picks the metrics dialect);
* ``set_policies``: ``models`` is None (no allowlist, every model accepted as named) when no
  InferenceModel names the pool, otherwise the allowlist of their ``modelName``s (the oldest
  object wins a duplicate name).  Objectives: name → ``priority`` (unset = 0).  A ``poolRef``
  matches when its name is the pool's and its group (default ``inference.networking.x-k8s.io``
  for InferenceModel, ``inference.networking.k8s.io`` for InferenceObjective, as the APIs
  define) is the pool's group.

The sink is written only when what it would receive changed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from kubernetes_asyncio import client as k8s_client

from epp.discovery import PoolSink
from epp.discovery._kube import Obj, Reflector, WatchTiming, close_api_client, new_api_client
from epp.domain import Criticality, Endpoint, FailureMode, ModelPolicies, ModelPolicy, Pool, TargetModel
from epp.errors import ConfigError

log = logging.getLogger(__name__)

V1_GROUP = "inference.networking.k8s.io"
V1ALPHA2_GROUP = "inference.networking.x-k8s.io"
LLMD_GROUP = "llm-d.ai"
POOL_VERSIONS = {V1_GROUP: "v1", V1ALPHA2_GROUP: "v1alpha2"}
ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"
MAX_TARGET_PORTS = 8


# ---- pure translation: API objects → epp values ------------------------------------------
@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What epp reads from an InferencePool, whichever its version."""

    selector: Mapping[str, str]
    target_ports: tuple[int, ...]
    failure_mode: FailureMode


def parse_pool(obj: Obj, group: str) -> PoolSpec:
    """The selector, target ports and failure mode of an InferencePool of ``group``."""
    spec = obj.get("spec") or {}
    if group == V1_GROUP:
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        ports = [p.get("number") for p in spec.get("targetPorts") or ()]
        picker = spec.get("endpointPickerRef") or {}
    else:
        selector = spec.get("selector") or {}
        ports = [spec.get("targetPortNumber")]
        picker = spec.get("extensionRef") or {}
    valid = tuple(dict.fromkeys(p for p in ports if isinstance(p, int) and 0 < p < 65536))
    if len(valid) != len(ports) or len(valid) > MAX_TARGET_PORTS:
        log.warning("InferencePool %s: target ports %s: using %s", _name(obj), ports, valid[:MAX_TARGET_PORTS])
    mode = FailureMode.FAIL_OPEN if picker.get("failureMode") == FailureMode.FAIL_OPEN else FailureMode.FAIL_CLOSE
    return PoolSpec(
        selector=MappingProxyType({str(k): str(v) for k, v in selector.items()}),
        target_ports=valid[:MAX_TARGET_PORTS],
        failure_mode=mode,
    )


def pod_is_ready(pod: Obj) -> bool:
    """An endpoint exists while the pod has an IP, ``Ready=True`` and no deletion timestamp."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """matchLabels semantics; an empty selector selects nothing (the APIs require one)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def endpoints_of(pods: Iterable[Obj], spec: PoolSpec) -> tuple[Endpoint, ...]:
    """The pool's endpoints: ready selected pods times target ports, sorted by pod name then port index."""
    out: list[Endpoint] = []
    several = len(spec.target_ports) > 1
    for pod in sorted(pods, key=_name):
        meta = pod.get("metadata") or {}
        labels: Mapping[str, str] = meta.get("labels") or {}
        if not selects(spec.selector, labels) or not pod_is_ready(pod):
            continue
        ip = pod["status"]["podIP"]
        host = f"[{ip}]" if ":" in ip else ip
        active = _active_ports(meta.get("annotations") or {})
        frozen_labels = MappingProxyType(dict(labels))
        for rank, port in enumerate(spec.target_ports):
            if active is not None and port not in active:
                continue
            name = f"{meta['name']}-rank-{rank}" if several else meta["name"]
            out.append(Endpoint(address=f"{host}:{port}", name=name, labels=frozen_labels))
    return tuple(out)


def _active_ports(annotations: Mapping[str, str]) -> frozenset[int] | None:
    raw = annotations.get(ACTIVE_PORTS_ANNOTATION)
    if raw is None:
        return None
    return frozenset(int(p) for p in raw.split(",") if p.strip().isdigit())


def _refers_to(obj: Obj, pool_name: str, pool_group: str, default_group: str) -> bool:
    ref = (obj.get("spec") or {}).get("poolRef") or {}
    return bool(ref.get("name") == pool_name and (ref.get("group") or default_group) == pool_group
                and (ref.get("kind") or "InferencePool") == "InferencePool")


def _age_key(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("creationTimestamp") or "", meta.get("name") or ""


def policies_of(models: Iterable[Obj], objectives: Iterable[Obj], *, pool_name: str, pool_group: str) -> ModelPolicies:
    """ModelPolicies from the InferenceModels and InferenceObjectives whose poolRef names the pool."""
    policies: dict[str, ModelPolicy] = {}
    for obj in sorted(models, key=_age_key):  # oldest first: it keeps a contested modelName
        if not _refers_to(obj, pool_name, pool_group, V1ALPHA2_GROUP):
            continue
        spec = obj.get("spec") or {}
        model_name = spec.get("modelName")
        if not model_name or model_name in policies:
            continue
        try:
            criticality = Criticality(spec.get("criticality") or Criticality.STANDARD)
        except ValueError:
            log.warning("InferenceModel %s: unknown criticality %r; using Standard", _name(obj), spec["criticality"])
            criticality = Criticality.STANDARD
        targets = tuple(
            TargetModel(name=t["name"], weight=int(t.get("weight") or 1))
            for t in spec.get("targetModels") or ()
            if t.get("name")
        )
        policies[model_name] = ModelPolicy(model_name=model_name, criticality=criticality, targets=targets)
    priorities = {
        _name(obj): int((obj.get("spec") or {}).get("priority") or 0)
        for obj in objectives
        if _refers_to(obj, pool_name, pool_group, V1_GROUP)
    }
    return ModelPolicies.of(policies or None, priorities)


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _same_pool(a: Pool | None, b: Pool | None) -> bool:
    """Equal including what ``Pool.__eq__`` ignores (labels, selector)."""
    if a is None or b is None:
        return a is b
    return (a == b and dict(a.selector) == dict(b.selector)
            and all(dict(x.labels) == dict(y.labels) for x, y in zip(a.endpoints, b.endpoints, strict=True)))


# ---- the source ----------------------------------------------------------------------------
class KubernetesPoolSource:
    """A :class:`~epp.discovery.PoolSource` following one InferencePool through the API server.

    Pass ``api_client`` (a kubernetes_asyncio ``ApiClient``, owned by the caller) or
    ``kubeconfig`` (a path; None with no ``api_client`` means in-cluster config), in which
    case the source makes its own client on :meth:`sync` and closes it in :meth:`aclose`.
    """

    def __init__(
        self,
        sink: PoolSink,
        *,
        pool_name: str,
        namespace: str = "default",
        group: str = V1_GROUP,
        api_client: Any = None,
        kubeconfig: str | None = None,
        engine: str = "vllm",
        timing: WatchTiming | None = None,
        sync_timeout: float = 10.0,
    ) -> None:
        if group not in POOL_VERSIONS:
            raise ConfigError(f"--pool-group {group!r}: expected one of {', '.join(POOL_VERSIONS)}")
        if not pool_name:
            raise ConfigError("--pool-name is required for Kubernetes discovery")
        self.pool_name = pool_name
        self.namespace = namespace
        self.group = group
        self.engine = engine
        self.timing = timing or WatchTiming()
        self.sync_timeout = sync_timeout
        self.changed = asyncio.Event()  # set whenever the sink was written (tests and probes wait on it)
        self._sink = sink
        self._api = api_client
        self._owns_api = api_client is None
        self._kubeconfig = kubeconfig
        self._pool_obj: Reflector | None = None
        self._pods: Reflector | None = None
        self._pods_selector: Mapping[str, str] = {}
        self._models: Reflector | None = None
        self._objectives: dict[str, Reflector] = {}
        self._selector_changed = asyncio.Event()
        self._core: Any = None
        self._holding = False  # during sync: collect, then write the first view once
        self._published = False  # the first view was written (even if empty)
        self._published_pool: Pool | None = None
        self._published_policies: ModelPolicies | None = None
        self._spec: PoolSpec | None = None

    # ---- PoolSource ----------------------------------------------------------------------
    async def sync(self) -> None:
        """List everything once and write the first view.

        An unreachable API server is logged, not raised: the view stays empty (readiness
        NOT_SERVING) and :meth:`run` keeps trying.  Bounded by ``sync_timeout``.
        """
        await self._connect()
        assert self._pool_obj is not None
        others = [r for r in (self._models, *self._objectives.values()) if r is not None]
        self._holding = True
        try:
            async with asyncio.timeout(self.sync_timeout):
                await asyncio.gather(self._pool_obj.try_list(), *(r.try_list() for r in others))
                if self._pods is not None:  # the pool's selector is known now
                    await self._pods.try_list()
        except TimeoutError:
            log.warning("Kubernetes discovery: no complete view within %.0fs; continuing in the background",
                        self.sync_timeout)
        finally:
            self._holding = False
        self._publish()

    async def run(self) -> None:
        """Follow every collection until cancelled."""
        await self._connect()
        assert self._pool_obj is not None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pool_obj.run(), name="watch-inferencepool")
            for r in (self._models, *self._objectives.values()):
                if r is not None:
                    tg.create_task(r.run(), name=f"watch-{r.what}")
            tg.create_task(self._follow_pods(), name="watch-pods")

    async def aclose(self) -> None:
        """Close the API client if this source made it."""
        if self._owns_api and self._api is not None:
            api, self._api = self._api, None
            await close_api_client(api)

    # ---- wiring ----------------------------------------------------------------------------
    async def _connect(self) -> None:
        if self._pool_obj is not None:
            return
        if self._api is None:
            self._api = await new_api_client(self._kubeconfig)
        custom = k8s_client.CustomObjectsApi(self._api)
        ns = self.namespace

        def collection(group: str, version: str, plural: str, **kw: Any) -> Any:
            return functools.partial(custom.list_namespaced_custom_object, group, version, ns, plural, **kw)

        self._pool_obj = Reflector(
            f"inferencepools.{self.group}/{self.pool_name}",
            collection(self.group, POOL_VERSIONS[self.group], "inferencepools",
                       field_selector=f"metadata.name={self.pool_name}"),
            on_change=self._on_pool_change, timing=self.timing, optional=True,
        )
        self._models = Reflector(f"inferencemodels.{V1ALPHA2_GROUP}",
                                 collection(V1ALPHA2_GROUP, "v1alpha2", "inferencemodels"),
                                 on_change=self._publish, timing=self.timing, optional=True)
        self._objectives = {
            group: Reflector(f"inferenceobjectives.{group}", collection(group, "v1alpha2", "inferenceobjectives"),
                             on_change=self._publish, timing=self.timing, optional=True)
            for group in (LLMD_GROUP, V1ALPHA2_GROUP)
        }
        self._core = k8s_client.CoreV1Api(self._api)

    def _on_pool_change(self) -> None:
        assert self._pool_obj is not None
        obj = self._pool_obj.items.get(self.pool_name)
        self._spec = parse_pool(obj, self.group) if obj is not None else None
        selector = dict(self._spec.selector) if self._spec is not None else {}
        if selector != dict(self._pods_selector):
            self._pods_selector = MappingProxyType(selector)
            self._pods = self._pod_reflector(selector) if selector else None
            self._selector_changed.set()
        self._publish()

    def _pod_reflector(self, selector: Mapping[str, str]) -> Reflector:
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        call = functools.partial(self._core.list_namespaced_pod, self.namespace, label_selector=label_selector)
        previous = self._pods
        reflector = Reflector(f"pods[{label_selector}]", call, on_change=self._publish, timing=self.timing)
        if previous is not None and previous.synced:
            # Keep serving the old pods (filtered by the new selector in _publish) until the
            # new selector's list arrives, instead of dropping every endpoint meanwhile.
            reflector.items = dict(previous.items)
            reflector.synced = True
        return reflector

    async def _follow_pods(self) -> None:
        """Run the pod reflector of the current selector; swap it when the selector changes."""
        while True:
            self._selector_changed.clear()
            waiter = asyncio.ensure_future(self._selector_changed.wait())
            task = asyncio.ensure_future(self._pods.run()) if self._pods is not None else None
            try:
                done, _ = await asyncio.wait({waiter} if task is None else {waiter, task},
                                             return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    task.result()  # a reflector returns only by raising: hand it to the supervisor
            finally:
                waiter.cancel()
                if task is not None:
                    await _stop(task)

    # ---- writing the sink ----------------------------------------------------------------
    def _publish(self) -> None:
        if self._holding:
            return
        pool = self._current_pool()
        policies = self._current_policies()
        changed, first = False, not self._published
        self._published = True
        if first or not _same_pool(pool, self._published_pool):
            self._published_pool = pool
            self._sink.set_pool(pool)
            changed = True
            if pool is None:
                log.info("InferencePool %s/%s: no complete view (absent or not listed yet)",
                         self.namespace, self.pool_name)
            else:
                log.info("InferencePool %s/%s: %d endpoints", self.namespace, self.pool_name, len(pool.endpoints))
        if first or policies != self._published_policies:
            self._published_policies = policies
            self._sink.set_policies(policies)
            changed = True
        if changed:
            self.changed.set()

    def _current_pool(self) -> Pool | None:
        spec = self._spec
        if spec is None or (spec.selector and (self._pods is None or not self._pods.synced)):
            return None
        pods = self._pods.items.values() if self._pods is not None else ()
        return Pool(
            name=self.pool_name, namespace=self.namespace, engine=self.engine, failure_mode=spec.failure_mode,
            target_ports=spec.target_ports, endpoints=endpoints_of(pods, spec), selector=spec.selector,
        )

    def _current_policies(self) -> ModelPolicies:
        models = self._models.items.values() if self._models is not None else ()
        # llm-d.ai's InferenceObjective supersedes the legacy group when both are installed.
        llmd = self._objectives.get(LLMD_GROUP)
        legacy = self._objectives.get(V1ALPHA2_GROUP)
        source = llmd if llmd is not None and llmd.available else legacy
        objectives = source.items.values() if source is not None else ()
        return policies_of(models, objectives, pool_name=self.pool_name, pool_group=self.group)


async def _stop(task: asyncio.Future[None]) -> None:
    """Cancel ``task`` and wait for it, without swallowing a cancellation of our own."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


__all__ = [
    "LLMD_GROUP", "V1ALPHA2_GROUP", "V1_GROUP", "KubernetesPoolSource", "PoolSpec", "endpoints_of", "parse_pool",
    "pod_is_ready", "policies_of", "selects",
]
