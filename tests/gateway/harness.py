"""What every test behind a gateway's wiring shares: pods on loopback addresses, the
loopback-only check of an Envoy config, one running stack (pods, epp, Envoy) and requests
through it.

* ``Pod``: ``support.upstreams.Upstream`` bound to any 127.0.0.0/8 address, so pods can
  have distinct IPs as Kubernetes pods do (GIE's conformance tests designate pods by IP).
* ``non_loopback(config)``: every IP-like string anywhere in a config outside 127.0.0.0/8
  and ::1; ``assert_loopback_only`` fails on any, and on any socket address that is not
  a loopback IP literal (a hostname would make Envoy ask DNS).
* ``Stack``: one running wiring; ``Stacks`` (the ``stacks`` fixture) starts and stops them.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from epp.app import App
from epp.envoy.process import EnvoyProcess

from support import settings, value
from support.serve import Serving
from support.upstreams import Upstream

COMPLETION = {"model": "m", "prompt": "Say hello", "max_tokens": 3}
BIG_PROMPT_CHARS = 200_000  # a long prompt: far over Envoy Gateway's 32 KiB default buffer


@dataclass
class Pod(Upstream):
    """An ``Upstream`` on ``host`` (any 127.0.0.0/8 address), port 0."""

    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> Pod:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self


# ---- the loopback rule -------------------------------------------------------------------

_IPV4 = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.])")
_IPV6 = re.compile(r"(?<![\w:.])\[?([0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})\]?(?![\w:])")


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _loopback(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return True  # not an address after all (a version string, a time): not ours to judge


def non_loopback(config: Any) -> list[str]:
    """Every IPv4/IPv6 literal in ``config`` (keys and values, all depths) outside loopback."""
    found: list[str] = []
    for text in _strings(config):
        for m in _IPV4.finditer(text):
            if not _loopback(m.group(1)):
                found.append(m.group(1))
        for m in _IPV6.finditer(text):
            candidate = m.group(1)
            if candidate.count(":") >= 2 and not _loopback(candidate):
                found.append(candidate)
    return found


def socket_addresses(config: Any) -> list[str]:
    """The ``address`` of every ``socket_address`` in ``config``."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("socket_address", "socketAddress"):  # Envoy reads both spellings
                sock = node.get(key)
                if isinstance(sock, dict) and "address" in sock:
                    out.append(str(sock["address"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return out


def assert_loopback_only(config: Any) -> None:
    """No address outside 127.0.0.0/8 and ::1 anywhere, and every socket address a loopback IP."""
    assert non_loopback(config) == [], "non-loopback addresses left in the config"
    sockets = socket_addresses(config)
    assert sockets, "no socket address at all: the walk found nothing to check"
    bad = [a for a in sockets if not _is_loopback_ip(a)]
    assert bad == [], f"socket addresses that are not loopback IP literals: {bad}"


def _is_loopback_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


# ---- one running stack ---------------------------------------------------------------------


@dataclass
class Stack:
    """Pods, epp (in-process ``App`` or an ``epp serve`` process) and Envoy, all on loopback."""

    url: str
    envoy: EnvoyProcess
    http: aiohttp.ClientSession
    pods: list[Pod]
    shadows: list[Pod] = field(default_factory=list)
    app: App | None = None
    served: Serving | None = None
    config: dict[str, Any] = field(default_factory=dict)
    host: str | None = None  # the Host header the wiring's virtual host matches (Envoy Gateway: the route's)

    def pod(self, address: str) -> Pod:
        (found,) = [p for p in self.pods if p.address == address]
        return found

    def by_name(self, name: str) -> Pod:
        (found,) = [p for p in self.pods if p.name == name]
        return found

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        assert self.app is not None, "metrics are read from an in-process App"
        return value(self.app, name, labels)

    async def post(
        self,
        doc: Any = None,
        *,
        data: bytes | None = None,
        path: str = "/v1/completions",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        payload = data if data is not None else orjson.dumps(doc)
        hdrs = {"content-type": "application/json", **({"host": self.host} if self.host else {}), **(headers or {})}
        body: bytes | io.BytesIO = io.BytesIO(payload) if len(payload) > 256 << 10 else payload  # aiohttp's advice
        async with self.http.post(self.url + path, data=body, headers=hdrs) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()

    async def access_log(self, lines: int, timeout: float = 5.0) -> list[str]:
        """The access log once it has ``lines`` lines.  Envoy flushes it every 100 ms and
        offers nothing to wait on, so this polls the file, bounded by ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                text = await asyncio.to_thread(self.envoy.stdout_path.read_text, "utf-8", "replace")
                found = [line for line in text.splitlines() if line.startswith("[")]
                if len(found) >= lines:
                    return found
                await asyncio.sleep(0.05)

    async def idle(self) -> None:
        """Every ext_proc stream of the in-process epp has ended."""
        assert self.app is not None
        await asyncio.wait_for(self.app.servicer.wait_idle(), 10)


class Stacks:
    """Starts the parts of stacks and stops every one of them, in reverse, at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self._closers: list[Any] = []
        self._n = 0

    def path(self, name: str) -> Path:
        self._n += 1
        return self.tmp_path / f"{self._n}-{name}"

    async def pods(self, n: int, *, prefix: str = "pod", hosts: list[str] | None = None) -> list[Pod]:
        out = []
        for i in range(n):
            pod = await Pod(f"{prefix}-{i}", host=hosts[i] if hosts else "127.0.0.1").start()
            self._closers.append(pod.aclose)
            out.append(pod)
        return out

    async def app(self, pool_path: Path, **overrides: Any) -> App:
        app = App(settings(pool_path, **overrides), registry=CollectorRegistry(), rng=random.Random(11))
        await app.start()
        self._closers.append(app.aclose)
        return app

    def own(self, closer: Any) -> None:
        self._closers.append(closer)

    async def envoy(self, config: dict[str, Any], listener: str | None = None) -> tuple[EnvoyProcess, str]:
        """Envoy on ``config`` (checked loopback-only first) and the URL of ``listener``
        (by default the config's only listener)."""
        assert_loopback_only(config)  # nothing outside 127.0.0.0/8 before Envoy starts
        envoy = EnvoyProcess(config, workdir=self.path("envoy"))
        self._closers.append(envoy.aclose)
        await envoy.start()
        return envoy, "http://" + await envoy.listener_address(listener or _listener_name(config))

    async def session(self) -> aiohttp.ClientSession:
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._closers.append(http.close)
        return http

    async def aclose(self) -> None:
        for closer in reversed(self._closers):
            await closer()
        self._closers.clear()


def _listener_name(config: dict[str, Any]) -> str:
    resources = config.get("static_resources") or config["staticResources"]
    (listener,) = resources["listeners"]
    return str(listener["name"])
