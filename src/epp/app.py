"""Builds epp from ``Settings`` and owns its lifetime: start, drain, stop.

Everything long-lived is created here and passed down by constructor; nothing is a
module-level singleton, so tests can run several Apps in one process.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from epp.config import PoolFile, Settings
from epp.datalayer import Datastore
from epp.datalayer.scraper import ScrapeLoops
from epp.discovery.static import StaticPoolSource
from epp.domain import Endpoint
from epp.extproc.server import ExtProcServer, ExtProcServicer
from epp.extproc.stream import ExtProcStream
from epp.extproc.tls import load_cert_dir, self_signed
from epp.observability.metrics import EppMetrics, PodLoad, PoolCollector, PoolSnapshot
from epp.routing import Router
from epp.scheduling import EndpointPickerConfig, build_scheduler, load_config_file

log = logging.getLogger(__name__)


class App:
    """One epp process: datastore, discovery, router, ext_proc + health + metrics servers."""

    def __init__(
        self, settings: Settings, *, registry: CollectorRegistry | None = None, rng: random.Random | None = None
    ) -> None:
        self.settings = settings
        self.metrics = EppMetrics(registry)
        self.datastore = Datastore()
        self.pool_source = StaticPoolSource(
            settings.pool_file, self.datastore, interval=settings.pool_file_poll_interval
        )
        self.pool_file: PoolFile = self.pool_source.load()
        profile: str | EndpointPickerConfig = settings.scheduling_profile
        if settings.config_file:
            profile = load_config_file(settings.config_file)
        self.scheduler = build_scheduler(
            profile,
            self.datastore,
            rng=rng,
            staleness=settings.metrics_staleness_threshold,
            max_endpoints=1 + settings.max_fallback_endpoints,
            observe=self.metrics.observe_plugin,
        )
        self.router = Router(
            self.datastore,
            self.scheduler,
            max_fallbacks=settings.max_fallback_endpoints,
            rng=rng,
            observe_schedule=self.metrics.scheduler_e2e.observe,
            staleness=settings.metrics_staleness_threshold,
        )
        self.metrics.registry.register(PoolCollector(self._pool_snapshot))
        interval = settings.refresh_metrics_interval
        self.scrapers = ScrapeLoops(
            self.datastore,
            interval=interval,
            on_error=self._scrape_failed,
            rng=rng,
            # a scrape may take a few intervals, but must end well before its data would be stale
            timeout=min(settings.metrics_staleness_threshold / 2, max(0.25, 5 * interval)),
        )
        self.servicer = ExtProcServicer(self.new_stream, self.metrics)
        tls = None
        if settings.secure_serving:
            tls = load_cert_dir(settings.cert_path) if settings.cert_path else self_signed()
        self.server = ExtProcServer(
            self.servicer,
            address=settings.bind_address,
            port=settings.grpc_port,
            health_port=settings.grpc_health_port,
            tls=tls,
        )
        self._metrics_runner: web.AppRunner | None = None
        self.metrics_port = 0
        self._closed = False

    @property
    def grpc_port(self) -> int:
        return int(self.server.port)

    @property
    def health_port(self) -> int:
        return int(self.server.health_port)

    def new_stream(self) -> ExtProcStream:
        return ExtProcStream(self.router, self.datastore, self.metrics, max_body_bytes=self.settings.max_body_bytes)

    def _pool_snapshot(self) -> PoolSnapshot:
        store, now, max_age = self.datastore, time.monotonic(), self.settings.metrics_staleness_threshold
        pods = []
        for e in store.endpoints():
            m = store.fresh_metrics(e.address, now, max_age)
            if m is None:
                pods.append(PodLoad(e.name, store.inflight(e.address)))
            else:
                pods.append(PodLoad(e.name, store.inflight(e.address), m.waiting, m.running, m.kv_usage))
        return PoolSnapshot(name=store.pool_name, pods=pods)

    def _scrape_failed(self, endpoint: Endpoint, reason: str) -> None:
        pool = self.datastore.mirror_name if endpoint in self.datastore.mirror_endpoints() else self.datastore.pool_name
        self.metrics.scrape_errors_total.labels(pool, endpoint.name, reason).inc()

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        await self.server.start()
        http = web.Application()
        http.router.add_get("/metrics", self._metrics_handler)
        self._metrics_runner = web.AppRunner(http, access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, self.settings.bind_address, self.settings.metrics_port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.metrics_port = sockets[0].getsockname()[1] if sockets else self.settings.metrics_port
        self.pool_source.start()
        if self.settings.refresh_metrics_interval > 0:  # 0 turns scraping off (non-vLLM backends, benchmarks)
            self.scrapers.start()
        await self.server.set_serving(self.datastore.synced)
        log.info(
            "epp serving pool %s (%d endpoints): ext_proc :%d (%s), health :%d, metrics :%d",
            self.datastore.pool_name,
            len(self.datastore.endpoints()),
            self.grpc_port,
            "tls" if self.settings.secure_serving else "plaintext",
            self.health_port,
            self.metrics_port,
        )

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting streams, let open ones finish (bounded), then stop everything."""
        if self._closed:
            return
        self._closed = True
        await self.pool_source.aclose()
        await self.server.drain(self.settings.drain_timeout if timeout is None else timeout)
        await self.scrapers.aclose()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()

    async def aclose(self) -> None:
        await self.drain(0)

    async def serve_until_signal(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("signal received: draining")
        await self.drain()
        log.info("stopped")
        return 0
