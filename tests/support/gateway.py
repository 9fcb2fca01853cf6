"""Real Envoy (the bootstrap ``epp envoy-config`` renders) + an in-process epp App +
plain HTTP upstreams, all on 127.0.0.1.  ``GatewayStarter`` starts as many as a test
needs and ``aclose()`` stops them all; the ``gateway`` fixture (tests/conftest.py) is one."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client import CollectorRegistry

from epp.app import App
from epp.config import load_pool_file
from epp.envoy.config import render_bootstrap
from epp.envoy.process import EnvoyProcess

from support import MODELS, pool_doc, settings, value, write_yaml
from support.upstreams import Upstream


@dataclass
class Gateway:
    url: str
    app: App
    envoy: EnvoyProcess
    upstreams: list[Upstream]
    http: aiohttp.ClientSession
    shadow: Upstream | None = None
    extra: list[Any] = field(default_factory=list)

    def by_address(self, address: str) -> Upstream | None:
        return next((u for u in self.upstreams if u.address == address), None)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return value(self.app, name, labels)

    async def post(self, doc: Any = None, *, data: bytes | None = None, path: str = "/v1/completions",
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        payload = data if data is not None else orjson.dumps(doc)
        async with self.http.post(self.url + path, data=payload,
                                  headers={"content-type": "application/json", **(headers or {})}) as r:
            return r.status, dict(r.headers), await r.read()


class GatewayStarter:
    """``await starter(**options)`` starts one Gateway in ``tmp_path``; ``aclose()`` stops all."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Gateway] = []

    async def __call__(
        self, *, n: int = 2, body_mode: str = "full-duplex", lb: str = "override-host", tls: bool = False,
        failure_mode: str = "FailClose", models: list[dict[str, Any]] | None = MODELS, mirror: bool = False,
        epp_extra_endpoints: tuple[str, ...] = (), envoy_endpoints: list[int] | None = None,
        mutate: Callable[[dict[str, Any]], None] | None = None, shadows: list[str] | None = None,
        mirror_lb: str = "load-aware", extra_endpoints: tuple[str, ...] = (), **overrides: Any,
    ) -> Gateway:
        """``extra_endpoints``: pods the test serves itself, in both epp's pool and Envoy's cluster."""
        tmp, k = self.tmp_path, len(self.started)
        ups = [await Upstream(f"pod-{i}").start() for i in range(n)]
        shadow = await Upstream("shadow").start() if mirror and shadows is None else None
        mirror_to = shadows if shadows is not None else [shadow.address] if shadow is not None else None
        doc = pool_doc([u.address for u in ups] + [*epp_extra_endpoints, *extra_endpoints], models=models,
                       mirror=mirror_to,
                       failure_mode=failure_mode)
        epp_pool = write_yaml(tmp / f"epp-{k}.yaml", doc)
        app = App(settings(epp_pool, secure_serving=tls, **overrides), registry=CollectorRegistry(),
                  rng=random.Random(11))
        await app.start()
        in_envoy = [*(ups[i].address for i in (envoy_endpoints or range(n))), *extra_endpoints]
        envoy_doc = pool_doc(in_envoy, models=models, mirror=mirror_to,
                             failure_mode=failure_mode)  # Envoy's cluster may list fewer
        envoy_pool = write_yaml(tmp / f"envoy-{k}.yaml", envoy_doc)
        config = render_bootstrap(
            load_pool_file(envoy_pool), listen_port=0, epp_address=f"127.0.0.1:{app.grpc_port}",
            body_mode=body_mode, lb=lb, epp_tls=tls, mirror_lb=mirror_lb,  # type: ignore[arg-type]
        )
        if mutate is not None:
            mutate(config)
        envoy = EnvoyProcess(config)
        await envoy.start()
        url = "http://" + await envoy.listener_address()
        gw = Gateway(url, app, envoy, ups, aiohttp.ClientSession(), shadow)
        self.started.append(gw)
        return gw

    async def aclose(self) -> None:
        for gw in self.started:
            await gw.http.close()
            await gw.envoy.aclose()
            await gw.app.aclose()
            for u in [*gw.upstreams, *([gw.shadow] if gw.shadow else [])]:
                await u.aclose()
        self.started.clear()
