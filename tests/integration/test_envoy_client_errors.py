"""Requests Envoy itself refuses, through the rendered config with epp's ext_proc filter
in both body modes: Envoy's own 400 / 426 / 431 reach the client (issue 13 item 8), and a
request whose header count leaves no room for epp's headers gets epp's 431 with a JSON
body, never Envoy's empty 500 (item 9).  Raw sockets, since HTTP clients refuse to send
the malformed requests."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from support.gateway import Gateway

GOOD = b'{"model": "m", "prompt": "Say hello", "max_tokens": 3}'


async def exchange(gw: Gateway, request: bytes) -> bytes:
    """Send raw bytes, read until Envoy closes the connection (every case here closes it)."""
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def post(extra_headers: bytes = b"", body: bytes = GOOD, version: bytes = b"HTTP/1.1") -> bytes:
    return (b"POST /v1/completions " + version + b"\r\nhost: gw\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n" % len(body) + extra_headers + b"\r\n" + body)


MALFORMED = [
    ("malformed-header-line", post(b"this is not a header\r\n"), 400),
    ("http-1.0", b"GET /v1/models HTTP/1.0\r\n\r\n", 426),
    ("oversized-headers", post(b"x-big: " + b"a" * 70_000 + b"\r\n"), 431),
    ("too-many-headers", post(b"".join(b"x-h%d: v\r\n" % i for i in range(120))), 431),
]


@pytest.mark.parametrize("body_mode", ["full-duplex", "buffered"])
async def test_envoys_own_replies_to_requests_it_refuses_reach_the_client(gateway, body_mode):
    gw = await gateway(body_mode=body_mode)
    for name, request, status in MALFORMED:
        reply = await exchange(gw, request)
        head = reply.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 %d " % status), (name, reply[:200])
        assert b"x-epp-envoy-local-reply" not in head, name  # the marker stays inside Envoy
    assert all(not u.seen for u in gw.upstreams)
    assert (await exchange(gw, post())).startswith(b"HTTP/1.1 200 ")  # epp still serves
    await gw.app.servicer.wait_idle()
    assert gw.app.datastore.load.total_inflight() == 0


@pytest.mark.parametrize("body_mode", ["full-duplex", "buffered"])
async def test_no_header_count_gives_an_empty_500(gateway, body_mode):
    """From a few headers to past Envoy's own limit: 200 while epp's headers fit, then epp's
    431 with a JSON body, then Envoy's 431; never a 500."""
    gw = await gateway(body_mode=body_mode)
    seen: dict[int, list[int]] = {}
    epp_answered = 0
    for n in range(80, 101):
        reply = await exchange(gw, post(b"".join(b"x-h%d: v\r\n" % i for i in range(n))))
        status = int(reply.split(b" ", 2)[1])
        seen.setdefault(status, []).append(n)
        if status == 431 and b"application/json" in reply.split(b"\r\n\r\n", 1)[0].lower():
            error = orjson.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
            assert error["code"] == 431 and "headers" in error["message"]
            epp_answered += 1
    assert set(seen) == {200, 431}, seen
    assert max(seen[200]) < min(seen[431])  # one boundary, not a flicker
    assert 0 < epp_answered < len(seen[431])  # epp's JSON 431 first, Envoy's own past its codec limit
    await gw.app.servicer.wait_idle()
    assert gw.app.datastore.load.total_inflight() == 0
