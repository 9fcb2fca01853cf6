"""Plain HTTP model-server stand-ins for gateway tests: record what arrives, answer
OpenAI-shaped JSON or SSE, optionally hold the response until the test releases it.

``serve_app`` starts any aiohttp application on a free port of 127.0.0.1 (port 0,
reported back); ``wait_for_arrivals`` waits, with a deadline, until stand-ins have
seen a number of requests between them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
from aiohttp import web


async def serve_app(app: web.Application) -> tuple[web.AppRunner, int]:
    """Run ``app`` on 127.0.0.1 port 0; the runner (to ``cleanup()``) and the port it got."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    name: str
    status: int = 200
    hold: asyncio.Event | None = None
    hold_body: asyncio.Event | None = None  # streaming: pause after the first event until set
    seen: list[Seen] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Upstream:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await serve_app(app)
        return self

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/metrics":  # epp's scraper: these stand-ins have no metrics
            return web.Response(status=404)
        body = await request.read()
        self.seen.append(Seen(request.method, request.path, {k.lower(): v for k, v in request.headers.items()}, body))
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        headers = {"x-served-by": self.name}
        if request.method == "GET":
            return web.json_response({"object": "list", "data": [], "served_by": self.name}, headers=headers)
        doc = orjson.loads(body) if body else {}
        model = doc.get("model", "")
        if self.status != 200:
            return web.json_response({"error": {"message": "upstream failure"}}, status=self.status, headers=headers)
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        if doc.get("stream"):
            resp = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
            await resp.prepare(request)
            for i, word in enumerate(("Hello", " from", f" {self.name}")):
                chunk = {"model": model, "choices": [{"index": 0, "text": word}]}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                if i == 0 and self.hold_body is not None:
                    await self.hold_body.wait()
            await resp.write(b"data: " + orjson.dumps({"model": model, "choices": [], "usage": usage}) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return web.json_response(
            {"id": "cmpl-1", "object": "text_completion", "model": model,
             "choices": [{"index": 0, "text": f"Hello from {self.name}"}], "usage": usage},
            headers=headers,
        )


async def wait_for_arrivals(
    upstreams: Sequence[Upstream], n: int, timeout: float = 10.0, *, method: str | None = None
) -> None:
    """Until the stand-ins have seen ``n`` requests between them (only ``method`` ones, when
    given: epp's own GET /v1/models reads arrive too); each ``arrived`` event is cleared and
    re-awaited on the way; ``TimeoutError`` after ``timeout`` seconds."""

    def count() -> int:
        return sum(1 for u in upstreams for s in u.seen if method is None or s.method == method)

    async with asyncio.timeout(timeout):
        while count() < n:
            for u in upstreams:
                u.arrived.clear()
            waits = [asyncio.ensure_future(u.arrived.wait()) for u in upstreams]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
