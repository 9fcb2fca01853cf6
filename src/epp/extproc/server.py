"""The grpc.aio servers: ext_proc (+ reflection, optional TLS) and gRPC health.

Optionally a third server on a Unix socket (``unix:///var/run/epp/epp.sock``): the same
ext_proc servicer and the same health servicer, for Envoy in the same pod (the sidecar
shape).  It is always plaintext: only processes that can open the socket file reach it,
so TLS would buy nothing.  The socket is made group- and world-connectable (its
directory, an ``emptyDir`` shared by the two containers, is what limits access), since
Envoy runs under another user than epp.

Drain: :meth:`ExtProcServer.drain` marks health NOT_SERVING, stops accepting new
streams and lets open ones finish within a bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from epp.errors import ConfigError
from epp.extproc import reflection
from epp.extproc.stream import ExtProcStream, Pending
from epp.observability.logging import request_id_var
from epp.observability.metrics import EppMetrics

log = logging.getLogger(__name__)

EXTPROC_SERVICE = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
LIVENESS = "liveness"  # SERVING while the process runs
# SERVING only while epp can route (the pool is known; in HA mode, this replica leads)
READINESS_NAMES = ("", "readiness", "inference-extension", EXTPROC_SERVICE)
UNIX_PREFIX = "unix:"
_SOCKET_MODE = 0o666  # Envoy's container runs under another uid; the shared directory limits access
_GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def _reuse(reuse_port: bool) -> list[tuple[str, int]]:
    """SO_REUSEPORT off by default (a port in use is an error); on for ``--workers``, whose
    processes all bind the same ports and let the kernel spread the connections."""
    return [("grpc.so_reuseport", 1 if reuse_port else 0)]


def unix_socket_path(address: str) -> str:
    """The file of a gRPC ``unix:`` address (``unix:///abs/path`` or ``unix:relative/path``)."""
    if not address.startswith(UNIX_PREFIX):
        raise ConfigError(f"--grpc-address {address!r}: expected unix:///path/to/epp.sock")
    rest = address[len(UNIX_PREFIX) :]
    path = rest[2:] if rest.startswith("//") else rest
    if not path or path.endswith("/"):
        raise ConfigError(f"--grpc-address {address!r}: no socket file name")
    return path


async def _decide_unless_ended(
    pending: Pending, messages: AsyncIterator[Any]
) -> tuple[list[Any] | None, asyncio.Future[Any] | None]:
    """Await a deferred decision while reading the stream's next message: Envoy sends nothing
    until it has the decision, so a read that ends first means the stream ended (a half-close:
    the HTTP request is gone) and the decision is dropped unmade, claiming nothing.  Returns
    the decision's replies (None when dropped) and the read still under way, if any, whose
    message comes next."""
    work = asyncio.ensure_future(pending.result())
    read: asyncio.Future[Any] = asyncio.ensure_future(anext(messages))
    try:
        await asyncio.wait((work, read), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        read.cancel()
        raise
    if work.done():
        return work.result(), read
    if isinstance(read.exception(), StopAsyncIteration):
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return None, None
    return await work, read  # a message before the decision (not Envoy's way): it is handled after it


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """One ``ExtProcStream`` per call; its ``close`` runs whatever way the call ends.

    ``open_streams`` is what ``epp_extproc_streams`` reports (read when ``/metrics`` is scraped).
    """

    def __init__(self, new_stream: Callable[[], ExtProcStream], metrics: EppMetrics) -> None:
        self._new_stream = new_stream
        self.open_streams = 0
        metrics.streams.set_function(lambda: self.open_streams)
        self._idle = asyncio.Event()
        self._idle.set()

    async def Process(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        stream = self._new_stream()
        self.open_streams += 1
        self._idle.clear()
        cancelled, failed = True, False
        messages = aiter(request_iterator)
        ahead: asyncio.Future[Any] | None = None  # the next message, read while a decision waited
        try:
            while True:
                try:
                    message = await (ahead if ahead is not None else anext(messages))
                except StopAsyncIteration:
                    break
                ahead = None
                out = stream.handle(message)
                if isinstance(out, Pending):  # the decision waits on the model server's token ids
                    decided, ahead = await _decide_unless_ended(out, messages)
                    if decided is None:
                        break  # the stream ended first (Envoy's graceful close: the client left)
                    out = decided
                for response in out:
                    yield response
                if stream.finished:
                    break
            cancelled = False
        except Exception:
            log.exception("ext_proc stream failed")
            cancelled, failed = False, True
            await context.abort(grpc.StatusCode.INTERNAL, "epp internal error")
        finally:
            if ahead is not None:
                ahead.cancel()
            stream.close(cancelled=cancelled, failed=failed)
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
        unix_address: str | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.servicer = servicer
        self.health = health.aio.HealthServicer()
        self._server = grpc.aio.server(options=_GRPC_OPTIONS + _reuse(reuse_port))
        pb_grpc.add_ExternalProcessorServicer_to_server(servicer, self._server)
        reflection.enable_server_reflection((EXTPROC_SERVICE, reflection.SERVICE_NAME), self._server)
        self.unix_address = unix_address
        self._unix_server = self._bind_unix(unix_address) if unix_address else None
        target = f"{address}:{port}"
        if tls is not None:
            key, cert = tls
            self.port = self._server.add_secure_port(target, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = self._server.add_insecure_port(target)
        self._health_server = grpc.aio.server(options=_reuse(reuse_port))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        self.health_port = self._health_server.add_insecure_port(f"{address}:{health_port}")
        self._stopped = False

    def _bind_unix(self, unix_address: str) -> grpc.aio.Server:
        """ext_proc + health on a Unix socket (bound now, so a bad path fails before start)."""
        path = unix_socket_path(unix_address)
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise ConfigError(f"--grpc-address {unix_address!r}: directory {directory} does not exist")
        server = grpc.aio.server(options=_GRPC_OPTIONS + _reuse(False))
        pb_grpc.add_ExternalProcessorServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((EXTPROC_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            server.add_insecure_port(unix_address)  # grpc replaces a stale socket file, not a regular file
        except RuntimeError:
            raise ConfigError(f"--grpc-address {unix_address!r}: cannot bind {path} (not a socket?)") from None
        os.chmod(path, _SOCKET_MODE)
        return server

    async def start(self) -> None:
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._health_server.start()
        await self._server.start()
        if self._unix_server is not None:
            await self._unix_server.start()

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
        servers = [self._server] if self._unix_server is None else [self._server, self._unix_server]
        await asyncio.gather(*(server.stop(grace=timeout) for server in servers))  # grpc removes the socket file
        await self._health_server.stop(grace=0.5)

    async def aclose(self) -> None:
        await self.drain(0)
