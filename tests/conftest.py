"""Shared fixtures: uvloop, the `epp` logger restored after every test, pool files, an
in-process epp App on free ports, an ext_proc client.  Plain helpers live in support/."""

# ruff: noqa: E402  (grpcenv.apply() must run before grpc is imported)

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from epp import grpcenv

# in-process servers run on the transport `epp serve` runs on (set before grpc loads)
assert grpcenv.apply(), "grpc was imported before tests/conftest.py: epp's gRPC settings would not apply"

import grpc
import pytest
import uvloop
from prometheus_client import CollectorRegistry

from epp.app import App

from support import pool_doc, settings, write_yaml
from support.gateway import GatewayStarter
from support.messages import ExtProcClient

PoolWriter = Callable[..., Path]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Tests run on uvloop, like `epp serve`."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
def _epp_logger_restored() -> Iterator[None]:
    """Whatever a test does to the `epp` logger (``epp serve`` in-process calls
    ``setup_logging``, which points it at the test's captured, soon closed, stderr and
    stops propagation), the next test gets it back as it was."""
    logger = logging.getLogger("epp")
    handlers, level, propagate, disabled = list(logger.handlers), logger.level, logger.propagate, logger.disabled
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)  # (setLevel, not .level =: it also clears the loggers' isEnabledFor cache)
    logger.propagate, logger.disabled = propagate, disabled


@pytest.fixture
def write_pool(tmp_path: Path) -> PoolWriter:
    """Write a pool file (``support.pool_doc``) into the test's directory; rewrite it to change the pool."""

    def write(endpoints: list[Any], *, name: str = "pool.yaml", **kw: Any) -> Path:
        return write_yaml(tmp_path / name, pool_doc(endpoints, **kw))

    return write


@pytest.fixture
async def start_app() -> AsyncIterator[Callable[..., Any]]:
    """Start in-process Apps on free ports (``support.settings`` plus overrides); all closed after the test."""
    apps: list[App] = []

    async def start(pool_path: Path, **overrides: Any) -> App:
        app = App(settings(pool_path, **overrides), registry=CollectorRegistry(), rng=random.Random(7))
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.aclose()


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[App], ExtProcClient]]:
    """An ext_proc client for an App (plaintext); channels closed after the test."""
    channels: list[grpc.aio.Channel] = []

    def make(app: App) -> ExtProcClient:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
        channels.append(ch)
        return ExtProcClient(ch)

    yield make
    for ch in channels:
        await ch.close()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayStarter]:
    """Start real Envoy + in-process epp + HTTP upstreams (``support.gateway``); all stopped after the test."""
    starter = GatewayStarter(tmp_path)
    yield starter
    await starter.aclose()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory in /tmp: a socket path must stay under 108 bytes, pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="epp-sock-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
