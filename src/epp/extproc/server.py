"""The grpc.aio servers: ext_proc (+ reflection, optional TLS) and gRPC health.

Drain: :meth:`ExtProcServer.drain` marks health NOT_SERVING, stops accepting new
streams and lets open ones finish within a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epp.extproc.stream import ExtProcStream
from epp.observability.logging import request_id_var
from epp.observability.metrics import EppMetrics

log = logging.getLogger(__name__)

EXTPROC_SERVICE = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
LIVENESS = "liveness"  # SERVING while the process runs
# SERVING only while epp can route (the pool is known; in HA mode, this replica leads)
READINESS_NAMES = ("", "readiness", "inference-extension", EXTPROC_SERVICE)


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """One ``ExtProcStream`` per call; its ``close`` runs whatever way the call ends."""

    def __init__(self, new_stream: Callable[[], ExtProcStream], metrics: EppMetrics) -> None:
        self._new_stream = new_stream
        self._metrics = metrics
        self.open_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def Process(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        stream = self._new_stream()
        self.open_streams += 1
        self._idle.clear()
        self._metrics.streams.inc()
        cancelled = True
        try:
            async for message in request_iterator:
                for response in stream.handle(message):
                    yield response
                if stream.finished:
                    break
            cancelled = False
        except Exception:
            log.exception("ext_proc stream failed")
            cancelled = False
            await context.abort(grpc.StatusCode.INTERNAL, "epp internal error")
        finally:
            stream.close(cancelled=cancelled)
            self._metrics.streams.dec()
            self.open_streams -= 1
            if self.open_streams == 0:
                self._idle.set()
            request_id_var.set("-")

    async def wait_idle(self) -> None:
        await self._idle.wait()


class ExtProcServer:
    """ext_proc on one port, health on another."""

    def __init__(
        self,
        servicer: ExtProcServicer,
        *,
        address: str,
        port: int,
        health_port: int,
        tls: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.servicer = servicer
        self.health = health.aio.HealthServicer()
        self._server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)]
        )
        pb_grpc.add_ExternalProcessorServicer_to_server(servicer, self._server)
        reflection.enable_server_reflection((EXTPROC_SERVICE, reflection.SERVICE_NAME), self._server)
        target = f"{address}:{port}"
        if tls is not None:
            key, cert = tls
            self.port = self._server.add_secure_port(target, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = self._server.add_insecure_port(target)
        self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        self.health_port = self._health_server.add_insecure_port(f"{address}:{health_port}")
        self._stopped = False

    async def start(self) -> None:
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._health_server.start()
        await self._server.start()

    async def set_serving(self, serving: bool) -> None:
        """Readiness (every name but liveness)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in READINESS_NAMES:
            await self.health.set(name, status)

    async def drain(self, timeout: float) -> None:
        """Stop taking new streams; wait up to ``timeout`` for open ones; then stop."""
        if self._stopped:
            return
        self._stopped = True
        await self.set_serving(False)
        log.info("draining: %d open streams, up to %.1fs", self.servicer.open_streams, timeout)
        await self._server.stop(grace=timeout)
        await self._health_server.stop(grace=0.5)

    async def aclose(self) -> None:
        await self.drain(0)
