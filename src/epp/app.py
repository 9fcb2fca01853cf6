"""Builds epp from ``Settings`` and owns its lifetime: start, drain, stop.

Everything long-lived is created here and passed down by constructor; nothing is a
module-level singleton, so tests can run several Apps in one process.  Every
background loop runs under one :class:`~epp.supervisor.Supervisor`.

Health: ``liveness`` is SERVING while the process runs; ``readiness`` (and the other
names Envoy or Kubernetes may ask for) is SERVING only while discovery knows the pool
and, with leader election on, while this replica holds the pool's Lease.  Every
replica watches and scrapes either way (a warm standby).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from epp.config import Settings
from epp.datalayer import Datastore
from epp.datalayer.scraper import ScrapeLoops
from epp.discovery import PoolSource
from epp.discovery.static import StaticPoolSource
from epp.domain import Endpoint
from epp.errors import ConfigError
from epp.extproc.server import ExtProcServer, ExtProcServicer
from epp.extproc.stream import ExtProcStream
from epp.extproc.tls import load_cert_dir, self_signed
from epp.observability.metrics import EppMetrics, PodLoad, PoolCollector, PoolSnapshot
from epp.routing import Router
from epp.scheduling import EndpointPickerConfig, build_scheduler, load_config_file
from epp.supervisor import Supervisor
from epp.wire import ADMIN_PATHS

log = logging.getLogger(__name__)

MIRROR_PROFILE = "least-loaded"  # the shadow pool's pick (load-aware mirroring)


class App:
    """One epp process: datastore, discovery, router, ext_proc + health + metrics servers."""

    def __init__(
        self, settings: Settings, *, registry: CollectorRegistry | None = None, rng: random.Random | None = None
    ) -> None:
        self.settings = settings
        rng = rng or random.Random()
        self.metrics = EppMetrics(registry, known_models=self._known_models)
        self._known: tuple[object, frozenset[str] | None] = (None, None)
        self.supervisor = Supervisor(on_failure=self._task_failed)
        self.datastore = Datastore(staleness=settings.metrics_staleness_threshold)
        self.discovery: PoolSource | None = None  # Kubernetes discovery needs an API client: made in start()
        if settings.pool_file:
            self.discovery = StaticPoolSource(
                settings.pool_file, self.datastore, interval=settings.pool_file_poll_interval
            )
        elif not settings.pool_name:
            raise ConfigError("epp serve needs --pool-file or --pool-name")
        self.elector: Any = None  # epp.discovery.leader.LeaderElector with --ha-enable-leader-election
        self._kube_api: Any = None
        profile: str | EndpointPickerConfig = settings.scheduling_profile
        if settings.config_file:
            profile = load_config_file(settings.config_file)
        self.kv_index: Any = None  # epp.datalayer.kvevents.KVEventIndex with --kv-events-port or -bind
        self.kv_subscriber: Any = None  # KVEventSubscriber (--kv-events-port) or KVEventCollector (--kv-events-bind)
        if settings.kv_events_port and settings.kv_events_bind:
            raise ConfigError("--kv-events-port and --kv-events-bind are alternatives: give one")
        if settings.kv_events_port or settings.kv_events_bind:
            self._setup_kv_events()
        self.peer_sync: Any = None  # epp.datalayer.peers.PeerSync with --peer-bind, and in every --workers worker
        self.peer_link: Any = None  # its transport, bound in start()
        if settings.peers and not settings.peer_bind:
            raise ConfigError("--peers needs --peer-bind (where this replica publishes)")
        if settings.peer_bind or settings.worker_peer_bind:
            from epp.datalayer.peers import PeerSync

            self.peer_sync = PeerSync(self.datastore.load, self.kv_index)
        scheduler = build_scheduler(
            profile,
            self.datastore,
            rng=rng,
            max_endpoints=1 + settings.max_fallback_endpoints,
            observe=self.metrics.plugin_timer,
            kv_index=self.kv_index,
            peers=self.peer_sync.load if self.peer_sync is not None else None,
        )
        self.router = Router(
            self.datastore,
            scheduler,
            mirror_scheduler=build_scheduler(MIRROR_PROFILE, self.datastore, rng=rng),
            rng=rng,
            observe_schedule=self.metrics.scheduler_e2e.observe,
            blocked_paths=() if settings.route_admin_paths else ADMIN_PATHS,
            trust_model_rewrite_header=settings.trust_model_rewrite_header,
        )
        self.tokenize: Any = None  # epp.datalayer.tokenize.TokenizeClient when a precise scorer uses vllm-tokenize
        if self.router.tokenizes:
            from epp.datalayer.tokenize import TokenizeClient

            self._tokenize_turn = 0
            self.tokenize = TokenizeClient(self._tokenize_server, observe=self.metrics.observe_tokenize)
        self.metrics.registry.register(PoolCollector(self._pool_snapshot))
        interval = settings.refresh_metrics_interval
        self.scrapers = ScrapeLoops(
            self.datastore,
            self.supervisor,
            interval=interval,
            on_error=self._scrape_failed,
            rng=rng,
            # a scrape may take a few intervals, but must end well before its data would be stale
            timeout=min(settings.metrics_staleness_threshold / 2, max(0.25, 5 * interval)),
        )
        self.servicer = ExtProcServicer(self.new_stream, self.metrics)
        self._tls = None
        if settings.secure_serving:
            self._tls = load_cert_dir(settings.cert_path) if settings.cert_path else self_signed()
        self._server: ExtProcServer | None = None
        self._health_dirty = asyncio.Event()
        self._metrics_runner: web.AppRunner | None = None
        self.metrics_port = 0
        self._closed = False

    def _setup_kv_events(self) -> None:
        """The KV-event index (what each pod's cache holds, from its events) and its subscriber."""
        from epp.datalayer.kvevents import KVEventIndex, KVEventSubscriber, port_endpoint, topic_prefix
        from epp.scheduling.blockkeys import BlockKeys

        def capacity_of(address: str) -> int | None:
            m = self.datastore.metrics(address)
            return (m.num_blocks or None) if m is not None else None

        self.kv_index = KVEventIndex(BlockKeys(), capacity_of=capacity_of)
        if not self.settings.kv_events_bind:
            self.kv_subscriber = KVEventSubscriber(
                self.kv_index,
                port_endpoint(self.settings.kv_events_port),
                topic_of=topic_prefix(self.settings.kv_events_topic_template),
            )

    @property
    def server(self) -> ExtProcServer:
        """The gRPC servers; they bind their ports in :meth:`start`, after discovery's first sync."""
        if self._server is None:
            raise RuntimeError("epp is not started")
        return self._server

    @property
    def grpc_port(self) -> int:
        return int(self.server.port)

    @property
    def health_port(self) -> int:
        return int(self.server.health_port)

    @property
    def serving(self) -> bool:
        """What readiness reports."""
        leading = self.elector is None or self.elector.is_leader
        return self.datastore.ready and leading and not self._closed

    def new_stream(self) -> ExtProcStream:
        return ExtProcStream(
            self.router,
            self.metrics,
            max_body_bytes=self.settings.max_body_bytes,
            max_request_headers=self.settings.max_request_headers,
            conformance_hooks=self.settings.conformance_test_hooks,
            tokenize=self.tokenize,
        )

    def _tokenize_server(self, model: str) -> str | None:
        """The pool's model server that tokenizes next: round robin over the routable ones that
        serve ``model`` (all routable ones while no server is known to)."""
        endpoints: Sequence[Endpoint] = self.datastore.routable()
        serving = self.datastore.servers_of(model)
        if serving:
            endpoints = [e for e in endpoints if e.address in serving] or endpoints
        if not endpoints:
            return None
        self._tokenize_turn = (self._tokenize_turn + 1) % len(endpoints)
        return endpoints[self._tokenize_turn].address

    def _known_models(self) -> frozenset[str] | None:
        """The allowlist's model names and their targets (None without an allowlist), cached per policy value."""
        policies = self.datastore.policies
        if self._known[0] is not policies:
            models = policies.models
            names = None if models is None else frozenset(models) | {t.name for p in models.values() for t in p.targets}
            self._known = (policies, names)
        return self._known[1]

    def _pool_snapshot(self) -> PoolSnapshot:
        store = self.datastore
        peers = self.peer_sync.load.requests if self.peer_sync is not None else None
        pods = []
        for e in store.endpoints():
            m = store.fresh_metrics(e.address)
            inflight = store.load.inflight(e.address)
            peer = peers.get(e.address, 0) if peers is not None else 0
            pods.append(
                PodLoad(e.name, inflight, peer_inflight=peer)
                if m is None
                else PodLoad(e.name, inflight, m.waiting, m.running, m.kv_usage, peer)
            )
        return PoolSnapshot(name=store.pool.name if store.pool else "", pods=pods, peers=peers is not None)

    def _scrape_failed(self, endpoint: Endpoint, reason: str) -> None:
        pool = self.datastore.pool_of(endpoint.address)
        self.metrics.scrape_errors_total.labels(pool.name if pool else "", endpoint.name, reason).inc()

    def _task_failed(self, name: str) -> None:
        self.metrics.background_failures_total.labels(name.split(" ", 1)[0]).inc()

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _follow_health(self) -> None:
        """Readiness follows discovery: every datastore change re-applies ``serving``."""
        while True:
            await self._health_dirty.wait()
            self._health_dirty.clear()
            await self.server.set_serving(self.serving)

    async def _start_kubernetes(self) -> PoolSource:
        """The API client, the pool's source and (with HA) its leader elector."""
        from kubernetes_asyncio.config import ConfigException

        from epp.discovery._kube import new_api_client
        from epp.discovery.kubernetes import KubernetesPoolSource
        from epp.discovery.leader import LeaderElector, lease_name

        s = self.settings
        try:
            self._kube_api = await new_api_client(s.kubeconfig)
        except (ConfigException, OSError) as exc:
            where = f"kubeconfig {s.kubeconfig}" if s.kubeconfig else "in-cluster config"
            raise ConfigError(f"cannot reach Kubernetes ({where}): {exc}") from None
        if s.ha_enable_leader_election:
            self.elector = LeaderElector(
                self._kube_api,
                namespace=s.pool_namespace,
                name=lease_name(s.pool_name, s.pool_namespace),
                lease_duration=s.lease_duration,
                renew_deadline=s.lease_renew_deadline,
                retry_period=s.lease_retry_period,
                on_change=lambda leader: self._health_dirty.set(),
            )
        return KubernetesPoolSource(
            self.datastore,
            pool_name=s.pool_name,
            namespace=s.pool_namespace,
            group=s.pool_group,
            api_client=self._kube_api,
        )

    async def start(self) -> None:
        if self.discovery is None:
            self.discovery = await self._start_kubernetes()
        await self.discovery.sync()  # a bad pool file raises ConfigError here (exit code 2), before any bind
        s = self.settings
        try:
            self._server = ExtProcServer(
                self.servicer,
                address=s.bind_address,
                port=s.grpc_port,
                health_port=s.grpc_health_port,
                tls=self._tls,
                unix_address=s.grpc_address,
                reuse_port=s.reuse_port,
            )
        except RuntimeError as exc:  # grpc's "Failed to bind": the port is taken or not ours
            raise ConfigError(
                f"cannot listen on {s.bind_address}:{s.grpc_port} (ext_proc) or :{s.grpc_health_port} (health): {exc}"
            ) from None
        try:
            if s.kv_events_bind:  # bound after discovery, as the other ports
                from epp.datalayer.kvcollect import KVEventCollector

                self.kv_subscriber = KVEventCollector(self.kv_index, s.kv_events_bind)
            if self.peer_sync is not None:
                from epp.datalayer.peers import PeerLink

                binds = [b for b in (s.peer_bind, s.worker_peer_bind) if b]  # other pods' replicas; sibling workers
                self.peer_link = PeerLink(self.peer_sync, binds, s.peers, connect=s.worker_peers)
        except ConfigError:  # what was bound before is let go: the caller exits 2
            self._close_sockets()
            raise
        await self.server.start()
        http = web.Application()
        http.router.add_get("/metrics", self._metrics_handler)
        self._metrics_runner = web.AppRunner(http, access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, s.bind_address, s.metrics_port)
        try:
            await site.start()
        except OSError as exc:
            await self.server.drain(0)
            self._close_sockets()
            raise ConfigError(f"cannot listen on {s.bind_address}:{s.metrics_port} (metrics): {exc.strerror}") from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.metrics_port = sockets[0].getsockname()[1] if sockets else self.settings.metrics_port
        self.datastore.on_change(self._health_dirty.set)
        await self.server.set_serving(self.serving)
        self.supervisor.spawn("health", self._follow_health)
        self.supervisor.spawn("discovery", self.discovery.run)
        if (sub := self.kv_subscriber) is not None:  # one SUB socket per pod, following membership
            self.datastore.on_change(lambda: sub.follow(self.datastore.all_endpoints()))
            sub.follow(self.datastore.all_endpoints())
            self.supervisor.spawn("kv-events", sub.run)
        if self.peer_link is not None:
            self.supervisor.spawn("peers", self.peer_link.run)
        if self.elector is not None:
            self.supervisor.spawn("leader-election", self.elector.run)
        if self.settings.refresh_metrics_interval > 0:  # 0 turns scraping off (non-vLLM backends, benchmarks)
            self.scrapers.start()
        pool = self.datastore.pool
        log.info(
            "epp serving pool %s (%d endpoints): ext_proc :%d (%s), health :%d, metrics :%d",
            pool.name if pool else "-",
            len(self.datastore.endpoints()),
            self.grpc_port,
            "tls" if self.settings.secure_serving else "plaintext",
            self.health_port,
            self.metrics_port,
        )

    def ready_line(self) -> dict[str, object]:
        """The readiness contract of ``epp serve``: printed once as one JSON line on stdout."""
        pool = self.datastore.pool
        return {
            "event": "ready",
            "discovery": "file" if self.settings.pool_file else "kubernetes",
            "grpc_port": self.grpc_port,
            "health_port": self.health_port,
            "metrics_port": self.metrics_port,
            "pool": pool.name if pool else None,
            "endpoints": len(self.datastore.endpoints()),
            "tls": self.settings.secure_serving,
            **({"peer_port": self.peer_link.port} if self.settings.peer_bind else {}),
            **({"kv_events_port": self.kv_subscriber.port} if self.settings.kv_events_bind else {}),
        }

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting streams, let open ones finish (bounded), then stop everything."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            await self._server.drain(self.settings.drain_timeout if timeout is None else timeout)
        if self.peer_link is not None:  # every claim is released now: peers hear it at once
            with contextlib.suppress(Exception):
                await self.peer_link.flush()
        self.scrapers.close()
        if self.tokenize is not None:
            await self.tokenize.aclose()
        await self.supervisor.aclose()  # a held Lease is released here (the elector's run is cancelled)
        self._close_sockets()
        if self._kube_api is not None:
            from epp.discovery._kube import close_api_client

            await close_api_client(self._kube_api)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()

    def _close_sockets(self) -> None:
        """The ZMQ sockets (KV events, peers); idempotent."""
        if self.kv_subscriber is not None:
            self.kv_subscriber.close()
        if self.peer_link is not None:
            self.peer_link.close()

    async def aclose(self) -> None:
        await self.drain(0)

    async def serve_until_signal(self, on_ready: Callable[[App], None] | None = None) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        if on_ready is not None:
            on_ready(self)
        await stop.wait()
        log.info("signal received: draining")
        await self.drain()
        log.info("stopped")
        return 0
