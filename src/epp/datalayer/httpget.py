"""A minimal keep-alive HTTP/1.1 client for metric scrapes (GET) and token-id requests (POST).

Why not aiohttp here: at 200 endpoints x 20 scrapes/s the per-request cost of a
general client dominates (measured ≈ 280 µs of CPU per scrape with aiohttp's
ClientSession, against ≈ 60 µs with this protocol; see benchmarks/scrape_bench.py).
A scrape is always the same request to the same host over one kept-alive
connection, so a small ``asyncio.Protocol`` that writes prebuilt request bytes and
frames the response (Content-Length or chunked) is all that is needed.  ``post``
sends a body on the same connection (``epp.datalayer.tokenize``: vLLM's ``/tokenize``,
≈ 250 µs of CPU per call with aiohttp, measured in ``benchmarks/kvevents_bench.py``).

Bounded: the response may not exceed ``max_bytes``; any protocol surprise closes the
connection and raises :class:`HttpGetError`; the next call reconnects.
"""

from __future__ import annotations

import asyncio
from typing import cast


class HttpGetError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Protocol(asyncio.Protocol):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.closed = False
        self._status = 0
        self._length: int | None = None
        self._chunked = False
        self._keep_alive = True
        self._header_end = -1
        self._body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            if self._header_end >= 0 and self._length is None and not self._chunked:
                self.waiter.set_result((self._status, bytes(self.buf[self._header_end :]), False))
            else:
                self.waiter.set_exception(HttpGetError("connection", f"connection closed: {exc or 'by peer'}"))

    def start(self, request: bytes) -> asyncio.Future[tuple[int, bytes, bool]]:
        assert self.transport is not None
        self.buf.clear()
        self._body.clear()
        self._header_end = -1
        self._length = None
        self._chunked = False
        self._keep_alive = True
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            return  # unsolicited bytes: the next request starts clean
        self.buf += data
        if len(self.buf) > self.max_bytes + 16384:
            self._fail("too_large", f"response larger than {self.max_bytes} bytes")
            return
        try:
            self._advance()
        except HttpGetError as exc:
            self._fail(exc.reason, str(exc))

    def _fail(self, reason: str, detail: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpGetError(reason, detail))
        if self.transport is not None:
            self.transport.close()

    def _advance(self) -> None:
        assert self.waiter is not None
        if self._header_end < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    raise HttpGetError("protocol", "response headers too large")
                return
            self._parse_head(bytes(self.buf[:end]))
            self._header_end = end + 4
        if self._chunked:
            self._advance_chunked()
        elif self._length is not None and len(self.buf) - self._header_end >= self._length:
            body = bytes(self.buf[self._header_end : self._header_end + self._length])
            self.waiter.set_result((self._status, body, self._keep_alive))

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HttpGetError("protocol", f"bad status line {lines[0][:60]!r}")
        self._status = int(parts[1])
        self._keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            value = value.strip()
            if key == b"content-length":
                if not value.isdigit():
                    raise HttpGetError("protocol", "bad content-length")
                self._length = int(value)
                if self._length > self.max_bytes:
                    raise HttpGetError("too_large", f"content-length {self._length} over {self.max_bytes}")
            elif key == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
            elif key == b"connection":
                self._keep_alive = value.lower() != b"close"

    def _advance_chunked(self) -> None:
        assert self.waiter is not None
        buf, pos = self.buf, self._header_end
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size_text = bytes(buf[pos:eol]).split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpGetError("protocol", f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                if buf.find(b"\r\n", eol + 2) < 0:  # wait for the (trailer-less) final CRLF
                    break
                self.waiter.set_result((self._status, bytes(self._body), self._keep_alive))
                return
            if len(buf) < eol + 2 + size + 2:
                break
            self._body += buf[eol + 2 : eol + 2 + size]
            if len(self._body) > self.max_bytes:
                raise HttpGetError("too_large", f"response larger than {self.max_bytes} bytes")
            pos = eol + 2 + size + 2
        del buf[self._header_end : pos]  # consumed chunks stay out of the buffer


class HttpGetter:
    """GETs one path from one ``host:port`` over a kept-alive connection."""

    def __init__(self, host: str, port: int, target: str, *, max_bytes: int = 4 << 20) -> None:
        self._host, self._port = host, port
        self._request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: epp-scraper\r\n"
            "Accept: text/plain\r\nAccept-Encoding: identity\r\n\r\n"
        ).encode()
        self._post_head = (
            f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: epp\r\n"
            "Accept: application/json\r\nAccept-Encoding: identity\r\nContent-Type: application/json\r\n"
        ).encode()
        self._max_bytes = max_bytes
        self._protocol: _Protocol | None = None

    async def get(self) -> tuple[int, bytes]:
        """One request; the caller bounds it with a timeout (cancellation closes the connection)."""
        return await self._send(self._request)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """One JSON ``body`` POSTed to the target; bounded by the caller as :meth:`get`."""
        return await self._send(b"%bContent-Length: %d\r\n\r\n%b" % (self._post_head, len(body), body))

    async def _send(self, request: bytes) -> tuple[int, bytes]:
        proto = self._protocol
        if proto is None or proto.closed:
            loop = asyncio.get_running_loop()
            try:
                _, proto = await loop.create_connection(lambda: _Protocol(self._max_bytes), self._host, self._port)
            except OSError as exc:
                raise HttpGetError("connection", f"connect failed: {exc.strerror or exc}") from None
            self._protocol = proto
        try:
            status, body, keep_alive = await proto.start(request)
        except BaseException:
            self.close()
            raise
        if not keep_alive:
            self.close()
        return status, body

    def close(self) -> None:
        proto, self._protocol = self._protocol, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
