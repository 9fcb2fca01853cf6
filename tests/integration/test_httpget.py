"""The scrape HTTP client against hand-written HTTP/1.1 responses on a real socket."""

from __future__ import annotations

import asyncio

import pytest

from epp.datalayer.httpget import HttpGetError, HttpGetter


async def serve(responses: list[bytes], *, close_after: bool = False):
    """A raw server answering each request on a connection with the next canned response."""
    queue = list(responses)
    connections = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while queue:
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"GET /metrics?x=1 HTTP/1.1\r\n")
            data = queue.pop(0)
            for i in range(0, len(data), 7):  # dribble bytes to exercise incremental framing
                writer.write(data[i : i + 7])
                await writer.drain()
            if close_after:
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


async def stop(server: asyncio.Server, connections: list[asyncio.StreamWriter]) -> None:
    for w in connections:
        w.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", (200, b"hello")),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
         (200, b"hello world")),
        (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", (404, b"")),
    ],
    ids=["content-length", "chunked", "status"],
)
async def test_framing_and_keep_alive(raw, expected):
    server, port, connections = await serve([raw, raw])
    getter = HttpGetter("127.0.0.1", port, "/metrics?x=1")
    try:
        assert await getter.get() == expected
        assert await getter.get() == expected
        assert len(connections) == 1  # both requests on one kept-alive connection
    finally:
        getter.close()
        await stop(server, connections)


async def test_close_delimited_body():
    server, port, connections = await serve([b"HTTP/1.0 200 OK\r\n\r\nuntil close"], close_after=True)
    getter = HttpGetter("127.0.0.1", port, "/metrics?x=1")
    try:
        assert await getter.get() == (200, b"until close")
    finally:
        getter.close()
        await stop(server, connections)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"SMTP ready\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "too_large"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "connection"),
    ],
    ids=["not-http", "too-large", "bad-chunk", "truncated"],
)
async def test_bad_responses_raise_and_reconnect(raw, reason):
    server, port, connections = await serve([raw, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
                                            close_after=True)
    getter = HttpGetter("127.0.0.1", port, "/metrics?x=1", max_bytes=1 << 20)
    try:
        with pytest.raises(HttpGetError) as info:
            await getter.get()
        assert info.value.reason == reason
        assert await getter.get() == (200, b"ok")  # a fresh connection serves the next scrape
        assert len(connections) == 2
    finally:
        getter.close()
        await stop(server, connections)


async def test_connection_refused():
    getter = HttpGetter("127.0.0.1", 9, "/metrics?x=1")
    with pytest.raises(HttpGetError) as info:
        await getter.get()
    assert info.value.reason == "connection"


async def test_post_sends_its_body_and_keeps_the_connection():
    """``post`` (the tokenizer's call): a JSON body with its length, then the next request on the same connection."""
    seen: list[tuple[bytes, bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
                b"content-length:"))  # fmt: skip
            seen.append((head, await reader.readexactly(length)))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    getter = HttpGetter("127.0.0.1", server.sockets[0].getsockname()[1], "/tokenize")
    try:
        assert await getter.post(b'{"prompt": "a"}') == (200, b"ok")
        assert await getter.post(b"{}") == (200, b"ok")
    finally:
        getter.close()
        server.close()
        await server.wait_closed()
    assert [body for _, body in seen] == [b'{"prompt": "a"}', b"{}"]
    head = seen[0][0]
    assert head.startswith(b"POST /tokenize HTTP/1.1\r\n") and b"Content-Type: application/json\r\n" in head
