"""Shared fixtures: pool files, an in-process epp App on free ports, an ext_proc client."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import uvloop
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

from epp.app import App
from epp.config import Settings

PoolWriter = Callable[..., Path]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Tests run on uvloop, like `epp serve`."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def write_pool(tmp_path: Path) -> PoolWriter:
    def write(endpoints: list[Any], *, models: list[dict[str, Any]] | None = None,
              mirror: list[str] | None = None, failure_mode: str = "FailClose", name: str = "pool.yaml") -> Path:
        doc: dict[str, Any] = {"pool": {"name": "test-pool", "failureMode": failure_mode, "endpoints": endpoints}}
        if models is not None:
            doc["models"] = models
        if mirror is not None:
            doc["mirror"] = {"name": "test-shadow", "endpoints": mirror}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc))
        return path

    return write


def make_settings(pool_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        pool_file=str(pool_path), grpc_port=0, grpc_health_port=0, metrics_port=0, bind_address="127.0.0.1",
        secure_serving=False, drain_timeout=2.0, pool_file_poll_interval=0.05,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def start_app() -> AsyncIterator[Callable[..., Any]]:
    apps: list[App] = []

    async def start(pool_path: Path, **overrides: Any) -> App:
        app = App(make_settings(pool_path, **overrides), registry=CollectorRegistry(), rng=random.Random(7))
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.aclose()


class ExtProcClient:
    """A thin ext_proc client: open a stream, send messages, read replies."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = pb_grpc.ExternalProcessorStub(channel)

    def open(self) -> Any:
        return self.stub.Process()

    async def send(self, call: Any, message: Any, replies: int) -> list[Any]:
        await call.write(message)
        return [await call.read() for _ in range(replies)]

    async def run(self, messages: list[Any]) -> list[Any]:
        """Send everything, half-close, collect all replies until the stream ends."""
        call = self.stub.Process()
        for m in messages:
            await call.write(m)
        await call.done_writing()
        out = []
        while (r := await call.read()) != grpc.aio.EOF:
            out.append(r)
        return out


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[App], ExtProcClient]]:
    channels: list[grpc.aio.Channel] = []

    def make(app: App) -> ExtProcClient:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
        channels.append(ch)
        return ExtProcClient(ch)

    yield make
    for ch in channels:
        await ch.close()
