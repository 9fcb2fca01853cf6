"""``TokenizeClient`` (``epp/datalayer/tokenize.py``) against a real HTTP server on 127.0.0.1
whose ``/tokenize`` answers as a test scripts it: what is sent, what is delivered, and that
every failure delivers nothing, raises nothing and is counted by outcome."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from epp.datalayer.tokenize import TokenizeClient

from support.upstreams import serve_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Job:
    url: str
    timeout: float = 2.0
    model: str = "m"
    delivered: list[list[int]] = field(default_factory=list)

    def body(self) -> dict[str, object]:
        return {"model": "m", "prompt": "hello"}

    def deliver(self, token_ids: Sequence[int]) -> None:
        self.delivered.append(list(token_ids))


@dataclass
class Server:
    url: str
    address: str
    bodies: list[Any]
    answer: list[Handler]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    bodies: list[Any] = []

    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response({"count": 3, "max_model_len": 8, "tokens": [1, 2, 4294967295], "token_strs": None})

    answer: list[Handler] = [ok]

    async def tokenize(request: web.Request) -> web.StreamResponse:
        bodies.append(orjson.loads(await request.read()))
        return await answer[0](request)

    app = web.Application()
    app.router.add_post("/tokenize", tokenize)
    runner, port = await serve_app(app)
    try:
        yield Server(f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", bodies, answer)
    finally:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[tuple[TokenizeClient, list[str]]]:
    outcomes: list[str] = []
    pick: list[str | None] = [None]
    c = TokenizeClient(lambda model: pick[0], observe=lambda outcome, seconds: outcomes.append(outcome))
    c.pick = pick  # type: ignore[attr-defined]  # the test's handle on which server the pool offers
    yield c, outcomes
    await c.aclose()


async def test_the_answers_ids_are_delivered(server: Server, client) -> None:
    c, outcomes = client
    job = Job(server.url)
    await c(job)
    assert job.delivered == [[1, 2, 4294967295]]
    assert server.bodies == [{"model": "m", "prompt": "hello"}]
    assert outcomes == ["ok"]


async def test_without_a_url_a_server_of_the_pool_is_asked(server: Server, client) -> None:
    c, outcomes = client
    await c(Job(""))  # the pool offers none
    assert outcomes == ["no_server"] and server.bodies == []
    c.pick[0] = server.address
    job = Job("")
    await c(job)
    assert job.delivered == [[1, 2, 4294967295]] and outcomes == ["no_server", "ok"]


def _answer(status: int, body: bytes) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type="application/json")

    return handler


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, b'{"error": "boom"}'),
        (404, b'{"object": "error", "message": "The model `m` does not exist."}'),
        (200, b"not json"),
        (200, b'{"count": 1}'),
        (200, b'{"tokens": [1, -2]}'),
        (200, b'{"tokens": [1, 4294967296]}'),
        (200, b'{"tokens": [1, 2.5]}'),
        (200, b'{"tokens": [1, "2"]}'),
        (200, b'{"tokens": [1, [2]]}'),
        (200, b'[1, 2]'),
    ],
    ids=["500", "404", "not-json", "no-tokens", "negative", "past-uint32", "float", "text", "nested", "bare-list"],
)
async def test_a_bad_answer_delivers_nothing(server: Server, client, status: int, body: bytes) -> None:
    c, outcomes = client
    server.answer[0] = _answer(status, body)
    job = Job(server.url)
    await c(job)
    assert job.delivered == [] and outcomes == ["error"]


async def test_an_answer_past_the_size_bound_delivers_nothing(server: Server) -> None:
    outcomes: list[str] = []
    c = TokenizeClient(lambda model: None, observe=lambda o, s: outcomes.append(o), max_response_bytes=64)
    try:
        big = orjson.dumps({"tokens": list(range(100))})

        async def chunked(request: web.Request) -> web.StreamResponse:  # no Content-Length: the bound is counted
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(big)
            await resp.write_eof()
            return resp

        for handler in (_answer(200, big), chunked):
            server.answer[0] = handler
            job = Job(server.url)
            await c(job)
            assert job.delivered == []
        assert outcomes == ["error", "error"]
    finally:
        await c.aclose()


async def test_a_server_that_does_not_answer_in_time_is_a_timeout(server: Server, client) -> None:
    c, outcomes = client
    never = asyncio.Event()

    async def stuck(request: web.Request) -> web.StreamResponse:
        await never.wait()
        return web.json_response({"tokens": [9]})

    server.answer[0] = stuck
    job = Job(server.url, timeout=0.05)
    await c(job)
    never.set()  # the handler may end now (the server would wait for it at shutdown)
    assert job.delivered == [] and outcomes == ["timeout"]
    server.answer[0] = _answer(200, b'{"tokens": [5]}')  # the client recovers: a new connection, a good answer
    job = Job(server.url)
    await c(job)
    assert job.delivered == [[5]] and outcomes == ["timeout", "ok"]


async def test_nothing_listening_is_an_error(client) -> None:
    c, outcomes = client
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = Job(f"http://127.0.0.1:{port}")
    await c(job)
    assert job.delivered == [] and outcomes == ["error"]


async def test_a_call_the_request_abandons_is_counted_as_cancelled(server: Server, client) -> None:
    c, outcomes = client
    never = asyncio.Event()
    arrived = asyncio.Event()

    async def stuck(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await never.wait()
        return web.json_response({"tokens": [9]})

    server.answer[0] = stuck
    job = Job(server.url)
    call = asyncio.ensure_future(c(job))
    await arrived.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    never.set()
    assert job.delivered == [] and outcomes == ["cancelled"]


async def test_after_close_nothing_is_asked(server: Server, client) -> None:
    c, outcomes = client
    c.pick[0] = server.address
    await c.aclose()
    job = Job("")
    await c(job)
    assert job.delivered == [] and outcomes == ["no_server"] and server.bodies == []
