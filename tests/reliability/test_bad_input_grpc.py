"""The bad-input matrix and ext_proc protocol abuse, straight at epp's gRPC port.

No Envoy: a client that talks to the port itself can send what Envoy never does
(``request_headers`` twice, a body first, empty messages, unknown body modes) and skip
what Envoy's config does for epp (stripping clients' copies of epp's control headers).
Per case: epp answers with an ImmediateResponse or ends the stream with a gRPC status,
never with an unhandled exception (no traceback in its log, no ERROR record, no
UNKNOWN/INTERNAL status); no claim is left (``total_inflight()`` back to 0, the running
gauge back to 0); and a good request is still routed afterwards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from reliability.inputs import INPUTS, MAX_BODY, MAX_ERROR_BODY, BadInput

from support import MODELS
from support.messages import (
    BUFFERED,
    FULL_DUPLEX,
    ExtProcClient,
    request_body,
    request_headers,
    request_trailers,
    response_body,
    response_headers,
    set_headers,
)

A, B = "127.0.0.1:18001", "127.0.0.1:18002"  # nothing listens: scraping is off, so they stay routable
ROGUE = "127.0.0.1:18009"  # not in the pool
GOOD = orjson.dumps({"model": "m", "prompt": "Say hello", "max_tokens": 3})
CHUNK = 64 * 1024
MODES = {"full-duplex": FULL_DUPLEX, "buffered": BUFFERED}


@dataclass
class Outcome:
    replies: list[Any] = field(default_factory=list)
    code: grpc.StatusCode | None = None
    details: str = ""

    @property
    def immediate(self) -> Any:
        return next((r.immediate_response for r in self.replies if r.WhichOneof("response") == "immediate_response"),
                    None)

    def problems(self) -> list[str]:
        """A non-OK end is epp's only before it answered: after an ImmediateResponse epp is done,
        and a write the client still had in flight fails on the client's side."""
        if self.code is grpc.StatusCode.OK or self.immediate is not None:
            return []
        return [f"stream ended {self.code} {self.details!r}"]

    def destination(self) -> str | None:
        for r in self.replies:
            if r.WhichOneof("response") in ("request_headers", "request_body"):
                dest = set_headers(r).get("x-gateway-destination-endpoint")
                if dest:
                    return dest
        return None

    def upstream_body(self, sent: bytes) -> bytes:
        """The body Envoy would forward: streamed chunks (full duplex) or the buffered replacement."""
        streamed = [r.request_body.response.body_mutation for r in self.replies
                    if r.WhichOneof("response") == "request_body"]
        if any(m.HasField("streamed_response") for m in streamed):
            return b"".join(m.streamed_response.body for m in streamed)
        return next((m.body for m in streamed if m.WhichOneof("mutation") == "body"), sent)


async def exchange(client: ExtProcClient, messages: list[Any], *, respond: bool = True) -> Outcome:
    """Write ``messages`` while reading epp's replies, to the end of the stream.

    ``respond``: once epp routed, play a 200 response from the pod, then half-close; without
    it the client half-closes as soon as its messages are written.  Writes after epp ended
    the stream (an ImmediateResponse) are dropped, as Envoy drops them.
    """
    call, out = client.open(), Outcome()

    async def write_all() -> None:
        try:
            for m in messages:
                if call.done():
                    return
                await call.write(m)
            if not respond:
                await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            return  # epp ended the stream: the rest is never read

    async with asyncio.timeout(10):
        writer = asyncio.create_task(write_all())
        routed = False
        try:
            while (reply := await call.read()) != grpc.aio.EOF:
                out.replies.append(reply)
                if respond and not routed and out.destination() and _request_done(out):
                    routed = True
                    await writer
                    await call.write(response_headers(200, {"content-type": "application/json"}))
                    await call.write(response_body(b'{"model": "m-target", "choices": []}', end_of_stream=True))
                    await call.done_writing()
        except grpc.aio.AioRpcError:
            pass  # the status is read below
        await writer
        out.code, out.details = await call.code(), await call.details()
    return out


def _request_done(out: Outcome) -> bool:
    """epp's routing replies are all in: the buffered body reply, or the streamed body's last chunk."""
    last = out.replies[-1]
    kind = last.WhichOneof("response")
    if kind == "request_headers":
        return not any(r.WhichOneof("response") == "request_body" for r in out.replies)  # headers-only decisions
    mutation = last.request_body.response.body_mutation
    return not mutation.HasField("streamed_response") or mutation.streamed_response.end_of_stream


def row_messages(row: BadInput, mode: int) -> list[Any]:
    headers = {k: v.replace("{rogue}", ROGUE) for k, v in row.headers.items() if k.lower() != "content-type"}
    if row.content_type:
        headers["content-type"] = row.content_type
    body = row.body or b""
    if row.body is not None and not row.chunked:
        headers["content-length"] = str(len(body))
    msgs = [request_headers(headers, path=row.path, method=row.method, end_of_stream=not body, mode=mode)]
    if body and mode == FULL_DUPLEX:
        parts = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
        msgs += [request_body(p, end_of_stream=i == len(parts) - 1) for i, p in enumerate(parts)]
    elif body:  # BUFFERED: Envoy sends the whole body in one message
        msgs.append(request_body(body, end_of_stream=True))
    return msgs


def check_row(row: BadInput, out: Outcome) -> list[str]:
    problems = out.problems()
    ir = out.immediate
    if not row.routed:
        if ir is None:
            return [*problems, f"no ImmediateResponse, expected {row.status} (destination {out.destination()})"]
        if ir.status.code != row.status:
            problems.append(f"status {ir.status.code}, expected {row.status}: {ir.body[:200]!r}")
        if len(ir.body) > MAX_ERROR_BODY:
            problems.append(f"error body of {len(ir.body)} bytes")
        err = orjson.loads(ir.body)["error"]
        if err["code"] != ir.status.code or not err["message"]:
            problems.append(f"error document {err!r}")
        return problems
    if ir is not None:
        return [*problems, f"ImmediateResponse {ir.status.code}, expected routing: {ir.body[:200]!r}"]
    dest = out.destination()
    if dest not in (A, B):
        problems.append(f"destination {dest!r}, expected a pool endpoint")
    if row.body:
        sent = out.upstream_body(row.body)
        model = orjson.loads(sent).get("model")
        if model != "m-target":
            problems.append(f"upstream model {str(model)[:80]!r}, expected m-target")
        if row.upstream_keeps and row.upstream_keeps not in sent:
            problems.append(f"upstream body lost {row.upstream_keeps!r}: {sent[:200]!r}")
        if row.upstream_lacks and row.upstream_lacks in sent:
            problems.append(f"upstream body has {row.upstream_lacks!r}")
    return problems


def running(app: Any) -> float:
    return sum(s.value for m in app.metrics.registry.collect() for s in m.samples
               if s.name == "inference_model_running_requests")


async def still_serves(app: Any, client: ExtProcClient) -> list[str]:
    """A good request is routed and, once every stream ended, nothing is claimed."""
    problems = []
    out = await exchange(client, row_messages(_GOOD_ROW, FULL_DUPLEX))
    if out.destination() not in (A, B) or out.code is not grpc.StatusCode.OK:
        problems.append(f"a good request afterwards: destination {out.destination()!r}, {out.code}")
    await asyncio.wait_for(app.servicer.wait_idle(), 10)
    if app.datastore.load.total_inflight() != 0:
        problems.append(f"{app.datastore.load.total_inflight()} still in flight")
    if running(app) != 0:
        problems.append(f"running gauge {running(app)}")
    return problems


_GOOD_ROW = BadInput("good", "good", GOOD, 200, "a good request", json_error=False)


def unhandled(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.name} {r.levelname}: {r.getMessage()[:200]}" for r in records
            if r.exc_info or r.levelno >= logging.ERROR]


@pytest.fixture
async def app(write_pool, start_app):
    return await start_app(write_pool([A, B], models=MODELS), refresh_metrics_interval=0, max_body_bytes=MAX_BODY)


@pytest.mark.parametrize("mode", MODES)
async def test_every_bad_input_gets_its_answer_over_grpc(app, client_for, caplog, mode):
    caplog.set_level(logging.INFO)
    client = client_for(app)
    rows = [r for r in INPUTS if r.grpc]
    assert rows
    failures: list[str] = []
    for row in rows:
        try:
            out = await exchange(client, row_messages(row, MODES[mode]))
        except Exception as exc:
            failures.append(f"{row.id}: {type(exc).__name__}: {exc}")
            continue
        failures += [f"{row.id} ({row.why}): {p}" for p in check_row(row, out)]
    failures += await still_serves(app, client)
    failures += unhandled(caplog.records)
    assert failures == [], "\n".join(failures)


# ---- protocol abuse ------------------------------------------------------------------------

def _fd_headers(**kw: Any) -> Any:
    return request_headers({"content-length": str(len(GOOD))}, **kw)


def _empty() -> Any:
    return pb.ProcessingRequest()


def _mode(request_mode: int) -> Any:
    msg = _fd_headers()
    msg.protocol_config.request_body_mode = request_mode
    return msg


@dataclass(frozen=True)
class Abuse:
    id: str
    messages: Callable[[], list[Any]]
    status: int | None  # the ImmediateResponse epp must send; None: any clean end (no routing needed)
    why: str


ABUSES = (
    Abuse("headers-twice", lambda: [_fd_headers(), _fd_headers()], 400, "one request per stream"),
    Abuse("headers-twice-buffered", lambda: [_fd_headers(mode=BUFFERED), _fd_headers(mode=BUFFERED)], 400,
          "one request per stream"),
    Abuse("body-before-headers", lambda: [request_body(GOOD)], 400,
          "a body with no request (no path, no method) must not be routed (today: routed, a claim taken)"),
    Abuse("trailers-only", lambda: [request_trailers()], 400, "no request at all"),
    Abuse("response-before-request", lambda: [response_headers(200), response_body(b"{}", end_of_stream=True)],
          None, "nothing to account: passed through or refused, never a claim"),
    Abuse("empty-message-first", lambda: [_empty()], 400,
          "no oneof set: a client error, not an internal one (today: ValueError, INTERNAL)"),
    Abuse("empty-message-after-headers", lambda: [_fd_headers(), _empty()], 400,
          "no oneof set: a client error (today: ValueError, INTERNAL)"),
    Abuse("mode-unknown-99", lambda: [_mode(99), request_body(GOOD)], 400,
          "an unknown body mode is a client error (today: ValueError, INTERNAL)"),
    Abuse("mode-negative", lambda: [_mode(-1), request_body(GOOD)], 400,
          "an unknown body mode is a client error (today: ValueError, INTERNAL)"),
    Abuse("mode-buffered-partial-cut", lambda: [_mode(3), request_body(GOOD[:10], end_of_stream=False)], 413,
          "BUFFERED_PARTIAL hit its limit: the body epp routes on is incomplete"),
    Abuse("oversized-in-many-chunks", lambda: [request_headers({}), *[
        request_body(b"x" * CHUNK, end_of_stream=False) for _ in range(MAX_BODY // CHUNK + 8)]], 413,
          "no content-length; the chunks pass the limit"),
)


@pytest.mark.parametrize("case", ABUSES, ids=[a.id for a in ABUSES])
async def test_protocol_abuse_ends_cleanly(app, client_for, caplog, case):
    caplog.set_level(logging.INFO)
    client = client_for(app)
    out = await exchange(client, case.messages(), respond=False)
    problems = out.problems()
    ir = out.immediate
    if case.status is not None:
        if ir is None or ir.status.code != case.status:
            got = ir.status.code if ir is not None else f"no ImmediateResponse (destination {out.destination()})"
            problems.append(f"expected {case.status}, got {got}")
        elif not orjson.loads(ir.body)["error"]["message"]:
            problems.append("empty error message")
    elif out.destination() is not None:
        problems.append(f"routed to {out.destination()}")
    problems += await still_serves(app, client)
    problems += unhandled(caplog.records)
    assert problems == [], f"{case.id} ({case.why}):\n" + "\n".join(problems)


@pytest.mark.parametrize("routed", [False, True], ids=["mid-body", "mid-response"])
async def test_a_cancelled_stream_releases_its_claim_once(app, client_for, caplog, routed):
    """end_of_stream never comes; the client cancels the call (Envoy does when the client goes away)."""
    caplog.set_level(logging.INFO)
    client = client_for(app)
    call = client.open()
    async with asyncio.timeout(10):
        await call.write(_fd_headers())
        if routed:
            await call.write(request_body(GOOD))
            replies = [await call.read(), await call.read()]  # the deferred headers reply + the streamed body
            assert set_headers(replies[0])["x-gateway-destination-endpoint"] in (A, B)
            assert app.datastore.load.total_inflight() == 1
            await call.write(response_headers(200, {"content-type": "application/json"}))
            assert (await call.read()).WhichOneof("response") == "response_headers"
            await call.write(response_body(b'{"choices": [', end_of_stream=False))
            await call.read()
        else:
            await call.write(request_body(GOOD[:10], end_of_stream=False))
        call.cancel()
        await app.servicer.wait_idle()
    assert app.datastore.load.total_inflight() == 0
    assert running(app) == 0
    assert await still_serves(app, client) == []
    assert unhandled(caplog.records) == []


@pytest.mark.parametrize("routed", [False, True], ids=["mid-body", "routed-no-response"])
async def test_a_stream_half_closed_mid_request_ends_cleanly(app, client_for, caplog, routed):
    """The client closes its side before end_of_stream (or before any response): no reply owed, no claim left."""
    caplog.set_level(logging.INFO)
    client = client_for(app)
    messages = [_fd_headers(mode=BUFFERED), request_body(GOOD)] if routed else [
        _fd_headers(), request_body(GOOD[:10], end_of_stream=False)]
    out = await exchange(client, messages, respond=False)
    assert out.code is grpc.StatusCode.OK
    assert out.immediate is None
    assert (out.destination() in (A, B)) is routed
    await asyncio.wait_for(app.servicer.wait_idle(), 10)
    assert app.datastore.load.total_inflight() == 0
    assert await still_serves(app, client) == []
    assert unhandled(caplog.records) == []

