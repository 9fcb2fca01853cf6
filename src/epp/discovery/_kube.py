"""The Kubernetes plumbing under discovery: an API client, JSON calls, a list+watch reflector.

Everything is kept as the API server's JSON (``dict``), never as kubernetes_asyncio's
generated models: the translation to epp's values lives in :mod:`epp.discovery.kubernetes`
and reads the fields it needs, which is simpler and cheaper than a model round trip.

A :class:`Reflector` mirrors one collection (one resource kind in one namespace, with a
field or label selector) into ``items``: a full list (paged), then a watch from the list's
``resourceVersion`` with bookmarks.  The watch ends every ``watch_timeout`` seconds (the
server closes it) and resumes from the last ``resourceVersion`` seen; ``410 Gone`` (the
version was compacted away) re-lists; connection errors and 5xx back off exponentially.
An *optional* collection (a CRD that may not be installed, or that RBAC does not grant)
answering 404/403 is logged once, mirrored as empty, and re-checked every
``recheck_interval`` seconds, so installing the CRD later turns the feature on.  One that
was listed keeps its last view through ``absent_grace`` seconds of such answers (a
restarting API server refuses briefly, until its RBAC and CRD caches have synced).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.watch import Watch

log = logging.getLogger(__name__)

Obj = dict[str, Any]
ListCall = Callable[..., Awaitable[Any]]  # a kubernetes_asyncio list_* method with its arguments bound

# Errors after which a list or watch is simply retried (with backoff): the API server is
# restarting, unreachable, overloaded, or the connection dropped mid-stream.
class MalformedEvent(ValueError):
    """A watch stream carried something that is not an event (the stream is abandoned and resumed)."""


TRANSIENT = (aiohttp.ClientError, OSError, TimeoutError, ValueError)  # ValueError: bad JSON, MalformedEvent


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


async def new_api_client(
    kubeconfig: str | None = None, *, context: str | None = None, service_account_dir: str = SERVICE_ACCOUNT_DIR
) -> Any:
    """An ``ApiClient`` from a kubeconfig file, or in-cluster config when ``kubeconfig`` is None.

    In-cluster: the API server from ``KUBERNETES_SERVICE_HOST``/``_PORT`` and the pod's
    service-account token and CA from ``service_account_dir``; the token file is re-read
    as the kubelet rotates it.  The caller owns the client (``await close_api_client(client)``).
    Raises ``kubernetes_asyncio.config.ConfigException`` when neither is usable.
    """
    configuration = k8s_client.Configuration()
    if kubeconfig is None:
        # Reads the token and CA files once (start-up, before serving).
        load_incluster: Any = k8s_config.load_incluster_config  # untyped upstream
        load_incluster(client_configuration=configuration, token_filename=f"{service_account_dir}/token",
                       cert_filename=f"{service_account_dir}/ca.crt")
    else:
        await k8s_config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration, persist_config=False
        )
    return k8s_client.ApiClient(configuration=configuration)


async def close_api_client(api: Any) -> None:
    """Close an ``ApiClient`` with its TLS connections aborted, not shut down gracefully: a
    graceful TLS close finishes on later loop turns, so a loop that stops first (a process
    exiting, a test ending) leaves the transports open, to be reported unclosed when they are
    collected."""
    connector = api.rest_client.pool_manager.connector
    if connector is not None:
        await connector.close(abort_ssl=True)
    await api.close()


async def call_json(call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Obj:
    """Call a kubernetes_asyncio API method and return the response body as JSON.

    Raises ``ApiException`` (with ``status``) for a non-2xx answer.
    """
    resp = await call(*args, _preload_content=False, **kwargs)
    try:
        body = await resp.read()
        if not 200 <= resp.status < 300:
            raise ApiException(status=resp.status, reason=_status_message(body, resp.reason))
        result: Obj = json.loads(body)
        return result
    finally:
        resp.release()


def _status_message(body: bytes, default: str | None) -> str:
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or default or "")


@dataclass(frozen=True, slots=True)
class WatchTiming:
    """How a reflector paces itself (tests shorten everything)."""

    watch_timeout: float = 300.0  # server-side end of each watch; the next resumes from its resourceVersion
    request_timeout: float = 30.0  # one list page, or the gap before a watch's first byte
    backoff: float = 0.2  # first retry delay after an error; doubles up to max_backoff, with jitter
    max_backoff: float = 5.0
    recheck_interval: float = 30.0  # how often an absent optional collection is looked for again
    page_size: int = 500
    # how long an optional collection that was listed may answer 403/404 before it is taken as
    # gone: an API server that has just restarted answers 403 until its RBAC caches have synced
    # (and 404 until its CRD informers have); meanwhile the last view is kept and re-listed
    absent_grace: float = 10.0

    def __post_init__(self) -> None:
        if min(self.watch_timeout, self.request_timeout, self.backoff, self.recheck_interval, self.absent_grace) <= 0:
            raise ValueError("WatchTiming values must be positive")
        if self.max_backoff < self.backoff or self.page_size < 1:
            raise ValueError("WatchTiming: max_backoff < backoff or page_size < 1")


class Reflector:
    """One collection mirrored into ``items`` (object name → JSON), following changes.

    ``on_change`` is called (synchronously) after every change to ``items`` and after
    every completed list, even an empty one, so a consumer can tell "listed, nothing
    there" from "not listed yet" through :attr:`synced`.
    """

    def __init__(
        self,
        what: str,
        call: ListCall,
        *,
        on_change: Callable[[], None],
        timing: WatchTiming,
        optional: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.items: dict[str, Obj] = {}
        self.resource_version: str | None = None
        self.synced = False  # a list completed (for an optional collection: or it is known absent)
        self.available: bool | None = None  # None until the first answer; False: absent or forbidden
        self.lists = 0  # completed full lists (the first one, then every 410 re-list)
        self._call = call
        self._on_change = on_change
        self._timing = timing
        self._optional = optional
        self._delay = timing.backoff
        self._last_warning = ""
        self._refused_since: float | None = None  # when a listed optional collection began answering 403/404
        self._clock = clock

    # ---- listing -------------------------------------------------------------------------
    async def list(self) -> None:
        """One full (paged) list replacing ``items``; raises ``ApiException`` or a transient error."""
        items: dict[str, Obj] = {}
        token: str | None = None
        while True:
            page = await call_json(
                self._call, limit=self._timing.page_size, _continue=token, _request_timeout=self._timing.request_timeout
            )
            for obj in page.get("items") or ():
                items[obj["metadata"]["name"]] = obj
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
        if self.available is False:
            log.info("%s: now available; following it", self.what)
        self.items = items
        self.resource_version = meta.get("resourceVersion")
        self.available = True
        self.synced = True
        self._refused_since = None
        self.lists += 1
        self._last_warning = ""
        self._on_change()

    async def try_list(self) -> bool:
        """:meth:`list`, turning an absent optional collection and transient errors into False."""
        try:
            await self.list()
            return True
        except ApiException as exc:
            if not self._absent(exc):
                self._warn(f"list failed: {exc.status} {exc.reason}")
        except TRANSIENT as exc:
            self._warn(f"list failed: {_describe(exc)}")
        return False

    def _absent(self, exc: ApiException) -> bool:
        """Handle 404/403 of an optional collection: mirror it as empty, log once.

        A collection that was listed keeps its last view for ``absent_grace`` seconds of such
        answers (re-listed with backoff meanwhile): a restarting API server gives them briefly.
        """
        if not (self._optional and exc.status in (403, 404)):
            return False
        if self.available:
            now = self._clock()
            if self._refused_since is None:
                self._refused_since = now
            if now - self._refused_since < self._timing.absent_grace:
                self._warn(f"answered HTTP {exc.status}; keeping the last view for up to "
                           f"{self._timing.absent_grace:g}s while re-listing")
                self.resource_version = None  # the next attempt is a list
                return True
        if self.available is not False:
            why = "not installed" if exc.status == 404 else "forbidden by RBAC"
            log.info("%s: %s (HTTP %s); feature off, re-checking every %.3gs",
                     self.what, why, exc.status, self._timing.recheck_interval)
        self.available = False
        self.synced = True
        self.resource_version = None
        self.items = {}
        self._on_change()
        return True

    # ---- following -----------------------------------------------------------------------
    async def run(self) -> None:
        """List (unless already listed) and watch, forever; cancel to stop."""
        while True:
            if self.resource_version is None:
                if not await self.try_list():
                    await self._pause()
                    continue
                self._delay = self._timing.backoff
            try:
                await self._watch()
                self._delay = self._timing.backoff  # the server ended the watch normally
            except ApiException as exc:
                if exc.status == 410:
                    log.info("%s: resourceVersion %s expired (410 Gone); re-listing", self.what, self.resource_version)
                    self.resource_version = None
                elif self._absent(exc):
                    await self._pause()
                else:
                    self._warn(f"watch failed: {exc.status} {exc.reason}")
                    await self._backoff()
            except TRANSIENT as exc:
                self._warn(f"watch interrupted: {_describe(exc)}; resuming from {self.resource_version}")
                await self._backoff()

    async def _watch(self) -> None:
        timeout = self._timing.watch_timeout * random.uniform(1.0, 1.2)  # spread the replicas' reconnects
        # return_type "object" keeps events as JSON (no model deserialisation).  With
        # timeout_seconds set, Watch neither retries 410 nor reconnects by itself: both
        # are decided here, where the re-list is.
        async with Watch(return_type="object") as watch:
            stream = watch.stream(
                self._watch_call,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=max(1, int(timeout)),
                _request_timeout=aiohttp.ClientTimeout(
                    total=timeout + self._timing.request_timeout, sock_connect=self._timing.request_timeout
                ),
            )
            async for event in stream:
                if not isinstance(event, dict):  # Watch hands back a line that is not JSON as is
                    if event.strip():
                        raise MalformedEvent(f"{self.what}: not a watch event: {event[:200]!r}")
                    continue
                self._apply(event["type"], event["raw_object"])

    async def _watch_call(self, *args: Any, **kwargs: Any) -> Any:
        """The list call in watch mode, refusing a non-200 answer before Watch reads it as events.

        (An unknown API group answers a plain-text ``404 page not found``, not a Status.)
        """
        resp = await self._call(*args, **kwargs)
        if resp.status != 200:
            try:
                body = await resp.read()
            finally:
                resp.release()
            raise ApiException(status=resp.status, reason=_status_message(body, resp.reason))
        return resp

    def _apply(self, kind: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        if rv := meta.get("resourceVersion"):
            self.resource_version = rv
        if kind in ("ADDED", "MODIFIED"):
            self.items[meta["name"]] = obj
        elif kind == "DELETED":
            self.items.pop(meta["name"], None)
        else:  # BOOKMARK: only the resourceVersion moves
            return
        self._delay = self._timing.backoff
        self._on_change()

    def _warn(self, message: str) -> None:
        """WARNING for a new kind of failure, DEBUG while the same one repeats (no log flood)."""
        level = logging.DEBUG if message == self._last_warning else logging.WARNING
        self._last_warning = message
        log.log(level, "%s: %s", self.what, message)

    async def _backoff(self) -> None:
        await asyncio.sleep(self._delay * random.uniform(0.8, 1.2))
        self._delay = min(self._delay * 2, self._timing.max_backoff)

    async def _pause(self) -> None:
        """Wait before looking again: the recheck interval if absent, else backoff."""
        if self.available is False:
            await asyncio.sleep(self._timing.recheck_interval)
        else:
            await self._backoff()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = [
    "SERVICE_ACCOUNT_DIR", "TRANSIENT", "ApiException", "ListCall", "MalformedEvent", "Obj", "Reflector", "WatchTiming",
    "call_json", "close_api_client", "new_api_client",
]
