"""The per-stream state machine: one ``ExtProcStream`` per Envoy ext_proc stream.

``handle(message)`` is synchronous and returns the responses to send, so every
protocol path is testable without gRPC.  Request-side and response-side state are
kept apart, as Envoy's own filter does.

Body modes are told apart from what Envoy sends: ``protocol_config`` (first message
of a stream, Envoy ≥ 1.33) names them.  Without it, BUFFERED is assumed, which is
safe because a buffered reply to the headers never loses the body.

* FULL_DUPLEX_STREAMED: the ``request_headers`` reply is deferred until the body ends;
  then one headers reply (destination header + ``envoy.lb`` metadata) and the body as
  ``streamed_response`` chunks.  Response chunks pass straight through.
* BUFFERED: headers are answered at once; the single body message is answered with the
  destination, metadata and (when rewritten) the new body and its Content-Length.
* NONE / STREAMED request bodies cannot be routed on: the request is routed on its
  headers, like a body-less GET.

GIE conformance test hooks (``conformance_hooks``, off by default; ``epp serve
--conformance-test-hooks``), as GIE's test picker has them: the request header
``test-epp-endpoint-selection: ip[,ip:port]`` narrows the pick to those endpoints (503
when none is in the pool), and the endpoint Envoy reports as served (``envoy.lb``
metadata with the response headers) is echoed in the response header
``x-conformance-test-served-endpoint``.  A gateway that forwards no metadata (Envoy AI
Gateway) gets no echo: the served endpoint is the gateway's to report, not epp's to guess.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from epp.domain import InferenceRequest, Pick
from epp.errors import BadRequest, HeadersTooMany, NoEndpoints, PayloadTooLarge, Rejected
from epp.extproc import responses
from epp.extproc.protocol import BodySendMode, Phase
from epp.observability.logging import request_id_var
from epp.observability.metrics import EppMetrics, ModelSeries
from epp.openai import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    ModelNameRestorer,
    UsageParser,
    new_request_id,
    parse_inference_request,
    rewrite_model,
)
from epp.routing import Claim, Router, TokenizeNeed, filter_subset, parse_subset
from epp.wire import (
    DESTINATION_HEADER,
    LB_NAMESPACE,
    MAX_REQUEST_HEADERS,
    MIRROR_HEADER,
    MODEL_REWRITE_HEADER,
    OBJECTIVE_HEADER,
    REQUEST_ID_HEADER,
    SERVED_KEY,
    SUBSET_HINT_NAMESPACE,
    SUBSET_KEY,
    TEST_SELECTION_HEADER,
    TEST_SERVED_HEADER,
)

log = logging.getLogger(__name__)

Response = Any  # ProcessingResponse

_BODY_REQUIRED = frozenset((COMPLETIONS, CHAT_COMPLETIONS))


class RequestState(enum.Enum):
    """Where the request direction of a stream is."""

    HEADERS = "waiting for request headers"
    BODY = "collecting the body"
    ROUTED = "routed"  # the decision is made; anything more of the body passes through


class ResponseState(enum.Enum):
    """Where the response direction of a stream is."""

    PENDING = "no response yet"
    STREAMING = "response headers seen"
    DONE = "response accounted"  # the claim is released


@dataclass(slots=True)
class RequestSide:
    state: RequestState = RequestState.HEADERS
    mode: BodySendMode = BodySendMode.BUFFERED
    headers: dict[str, str] = field(default_factory=dict)
    header_count: int = 0  # entries as Envoy counts them (a repeated header counts each time)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    subset: tuple[str, ...] | None = None


@dataclass(slots=True)
class ResponseSide:
    state: ResponseState = ResponseState.PENDING
    mode: BodySendMode = BodySendMode.NONE
    status: int = 0
    usage: UsageParser | None = None
    restorer: ModelNameRestorer | None = None
    served: str = ""  # the endpoint Envoy reports it used (envoy.lb metadata), if it reports one
    # Envoy has chosen the host before the response's first message, and forwards the same
    # metadata on every message: it is read from that first one only (not from every chunk)
    served_read: bool = False


@dataclass(slots=True)
class RequestContext:
    """Per-stream state, owned by the transport; never passed below ``routing``."""

    request_id: str = ""
    started: float = field(default_factory=time.monotonic)
    request: InferenceRequest | None = None
    ticket: Claim | None = None
    series: ModelSeries | None = None  # the model's metric children, once routed with a model
    model: str = ""
    target_model: str = ""
    req: RequestSide = field(default_factory=RequestSide)
    resp: ResponseSide = field(default_factory=ResponseSide)


_RESPONSE_KEYS = frozenset((":status", "content-type", "content-length"))  # all epp reads of a response's


def _header_map(http_headers: Any, only: frozenset[str] | None = None) -> dict[str, str]:
    """The headers as a dict (lower-case keys), or only the keys in ``only``."""
    out: dict[str, str] = {}
    for h in http_headers.headers.headers:
        key = h.key.lower()
        if only is not None and key not in only:
            continue
        raw = h.raw_value  # each field read of a protobuf message costs: read it once
        out[key] = raw.decode("utf-8", "replace") if raw else h.value
    return out


def _metadata_value(message: Any, namespace: str, key: str) -> str | list[str] | None:
    """One string (or list of strings) from the message's forwarded filter metadata, read in place
    (no conversion of the whole metadata to dicts)."""
    if not message.HasField("metadata_context"):
        return None
    filter_metadata = message.metadata_context.filter_metadata
    if namespace not in filter_metadata:
        return None
    fields = filter_metadata[namespace].fields
    if key not in fields:
        return None
    value = fields[key]
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return str(value.string_value)
    if kind == "list_value":
        return [str(v.string_value) for v in value.list_value.values if v.WhichOneof("kind") == "string_value"]
    return []  # present but neither: an empty (matching nothing) hint


def _body_mode(value: int, direction: str) -> BodySendMode:
    try:
        return BodySendMode(value)
    except ValueError:
        raise BadRequest(f"protocol_config names an unknown {direction} body mode {value}") from None


# fetches one TokenizeNeed and delivers it (or not, on failure: the decision falls back); never raises
Tokenize = Callable[[TokenizeNeed], Awaitable[None]]
_TOKENIZE_MARGIN = 0.05  # seconds past a call's own timeout before the decision stops waiting for it


class Pending:
    """Responses that wait on I/O first: a request whose decision needs the model server's
    token ids (``tokenizer: vllm-tokenize``).  The servicer awaits :meth:`result`; everything
    else about a stream stays synchronous.  ``extra`` (a trailers reply) is sent after the
    decision's replies, not after a rejection (an immediate response ends the stream)."""

    __slots__ = ("_work", "extra")

    def __init__(self, work: Coroutine[Any, Any, list[Response]], extra: list[Response]) -> None:
        self._work = work
        self.extra = extra  # the list ``work`` appends after a decision

    async def result(self) -> list[Response]:
        return await self._work


class ExtProcStream:
    """Turns the messages of one ext_proc stream into responses and a routing decision."""

    def __init__(
        self,
        router: Router,
        metrics: EppMetrics,
        *,
        max_body_bytes: int,
        max_request_headers: int = MAX_REQUEST_HEADERS,
        clock: Callable[[], float] = time.monotonic,
        conformance_hooks: bool = False,
        tokenize: Tokenize | None = None,
    ) -> None:
        self._router = router
        self._tokenize = tokenize if router.tokenizes else None
        self._metrics = metrics
        self._max_body = max_body_bytes
        self._max_headers = max_request_headers
        self._hooks = conformance_hooks
        self._clock = clock
        self.ctx = RequestContext(started=clock())
        self.finished = False  # an ImmediateResponse was sent: Envoy ends the stream
        self._closed = False
        self._first = True

    # ---- dispatch ----------------------------------------------------------------------
    def handle(self, message: Any) -> list[Response] | Pending:
        try:
            if self._first:
                self._first = False
                if message.HasField("protocol_config"):
                    pc = message.protocol_config
                    self.ctx.req.mode = _body_mode(pc.request_body_mode, "request")
                    self.ctx.resp.mode = _body_mode(pc.response_body_mode, "response")
            kind = message.WhichOneof("request")
            if kind == Phase.REQUEST_HEADERS:
                return self.on_request_headers(message)
            if kind == Phase.REQUEST_BODY:
                return self.on_request_body(message.request_body.body, message.request_body.end_of_stream)
            if kind == Phase.REQUEST_TRAILERS:
                return self.on_request_trailers()
            if kind is None:
                raise BadRequest("a ProcessingRequest with no request or response part")
            if not self.ctx.resp.served_read:
                self.ctx.resp.served_read = True
                self._note_served(message)
            if kind == Phase.RESPONSE_HEADERS:
                return self.on_response_headers(message)
            if kind == Phase.RESPONSE_BODY:
                return self.on_response_body(message.response_body.body, message.response_body.end_of_stream)
            return self.on_response_trailers()
        except Rejected as rejected:
            return [self._reject(rejected)]

    # ---- request path --------------------------------------------------------------------
    def on_request_headers(self, message: Any) -> list[Response]:
        ctx, req = self.ctx, self.ctx.req
        if req.state is not RequestState.HEADERS:  # Envoy never does this; a client talking to the port might
            raise BadRequest("request_headers sent twice on one ext_proc stream")
        req.state = RequestState.BODY
        http_headers = message.request_headers
        req.headers = headers = _header_map(http_headers)
        req.header_count = len(http_headers.headers.headers)
        ctx.request_id = headers.get(REQUEST_ID_HEADER) or new_request_id()
        request_id_var.set(ctx.request_id)
        path = headers.get(":path", "")
        self._router.check_path(path)
        hint = _metadata_value(message, SUBSET_HINT_NAMESPACE, SUBSET_KEY)
        if hint is not None:
            req.subset = parse_subset(hint)
        if self._hooks and TEST_SELECTION_HEADER in headers:
            req.subset = self._designated(headers[TEST_SELECTION_HEADER], req.subset)
        routed_on_headers = http_headers.end_of_stream or req.mode in (BodySendMode.NONE, BodySendMode.STREAMED)
        self._check_header_room(headers, req.header_count, body=not routed_on_headers)
        if http_headers.end_of_stream:
            if headers.get(":method") == "POST" and path.split("?", 1)[0] in _BODY_REQUIRED:
                raise BadRequest(f"{path.split('?', 1)[0]} needs a JSON request body")
            return [self._route_headers_only()]
        if req.mode in (BodySendMode.NONE, BodySendMode.STREAMED):
            return [self._route_headers_only()]
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self._max_body:
            raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of {self._max_body}")
        if req.mode is BodySendMode.FULL_DUPLEX_STREAMED:
            return []  # answered once the body is complete
        return [responses.request_headers_response()]

    def _check_header_room(self, headers: dict[str, str], count: int, *, body: bool) -> None:
        """431 now, before any body or pick, if the headers epp will add cannot fit: Envoy would
        refuse the mutation and answer 500 with no body (its header-count limit bounds both)."""
        added = (
            (DESTINATION_HEADER not in headers)
            + (REQUEST_ID_HEADER not in headers)
            + (body and "content-length" not in headers)
            + (self._router.mirrors and MIRROR_HEADER not in headers)
        )
        if count + added > self._max_headers:
            raise HeadersTooMany(
                f"the request has {count} headers; with the {added} the gateway adds "
                f"that exceeds the limit of {self._max_headers}"
            )

    def _designated(self, selection: str, hint: tuple[str, ...] | None) -> tuple[str, ...]:
        """The pool's endpoints a conformance test designated (and the subset hint allows)."""
        allowed = filter_subset(filter_subset(self._router.endpoints(), hint), parse_subset(selection) or ())
        if not allowed:
            raise NoEndpoints(f"no ready endpoint matches {TEST_SELECTION_HEADER} {selection[:200]!r}")
        return tuple(e.address for e in allowed)

    def on_request_body(self, chunk: bytes, end_of_stream: bool) -> list[Response] | Pending:
        req = self.ctx.req
        if req.state is RequestState.ROUTED:  # body after a headers-only decision (NONE/STREAMED modes)
            return self._pass_request_chunk(chunk, end_of_stream)
        if req.state is RequestState.HEADERS:
            raise BadRequest("request_body before request_headers")
        if chunk:
            req.size += len(chunk)
            if req.size > self._max_body:
                raise PayloadTooLarge(f"request body exceeds the limit of {self._max_body} bytes")
            req.chunks.append(chunk)
        if not end_of_stream:
            if req.mode is BodySendMode.FULL_DUPLEX_STREAMED:
                return []
            # BUFFERED_PARTIAL hit its limit: the rest will not come to us before routing.
            raise PayloadTooLarge("request body exceeds the gateway's buffer")
        return self._route_body(end_of_stream=True)

    def on_request_trailers(self) -> list[Response] | Pending:
        out: list[Response] | Pending = []
        state = self.ctx.req.state
        if state is RequestState.HEADERS:
            raise BadRequest("request_trailers before request_headers")
        if state is RequestState.BODY:
            out = self._route_body(end_of_stream=False)
        (out.extra if isinstance(out, Pending) else out).append(responses.trailers_response(Phase.REQUEST_TRAILERS))
        return out

    def _route_headers_only(self) -> Response:
        ctx = self.ctx
        request = InferenceRequest(
            request_id=ctx.request_id, model="", target_model="", subset=ctx.req.subset, headers=ctx.req.headers
        )
        pick = self._router.route(request)
        return responses.request_headers_response(*self._destination(pick, None), clear_route_cache=True)

    def _route_body(self, *, end_of_stream: bool) -> list[Response] | Pending:
        ctx, req = self.ctx, self.ctx.req
        body = req.chunks[0] if len(req.chunks) == 1 else b"".join(req.chunks)
        req.chunks = []
        headers = req.headers
        request, doc = parse_inference_request(
            body,
            headers,
            path=headers.get(":path", ""),
            request_id=ctx.request_id,
            subset=req.subset,
            objective=headers.get(OBJECTIVE_HEADER, ""),
            model_rewrite=headers.get(MODEL_REWRITE_HEADER, ""),
            prompt_source=self._tokenize is not None,
        )
        ctx.model = request.model
        if self._tokenize is not None:
            resolved, needs = self._router.prepare(request)
            if needs:
                extra: list[Response] = []
                work = self._route_after(needs, request, resolved, body=body, doc=doc, end_of_stream=end_of_stream,
                                         extra=extra)  # fmt: skip
                return Pending(work, extra)
            return self._routed(request, self._router.route(resolved, resolved=True), body, doc, end_of_stream)
        return self._routed(request, self._router.route(request), body, doc, end_of_stream)

    async def _route_after(
        self,
        needs: Sequence[TokenizeNeed],
        request: InferenceRequest,
        resolved: InferenceRequest,
        *,
        body: bytes,
        doc: Any,
        end_of_stream: bool,
        extra: list[Response],
    ) -> list[Response]:
        """Fetch the token ids, then decide (on the approximate index for ids that did not come).

        The fetch is bounded here too (its own timeout, plus a margin), and whatever it raises
        is logged, not sent: the decision comes regardless."""
        assert self._tokenize is not None
        tokenize = self._tokenize
        try:
            async with asyncio.timeout(max(n.timeout for n in needs) + _TOKENIZE_MARGIN):
                results = await asyncio.gather(*(tokenize(n) for n in needs), return_exceptions=True)
            for r in results:
                if isinstance(r, Exception):
                    log.warning("token ids not fetched: %r", r)
        except TimeoutError:
            log.warning("token ids not fetched within their timeout")
        try:
            out = self._routed(request, self._router.route(resolved, resolved=True), body, doc, end_of_stream)
        except Rejected as rejected:
            return [self._reject(rejected)]
        out.extend(extra)
        return out

    def _routed(
        self, request: InferenceRequest, pick: Pick, body: bytes, doc: Any, end_of_stream: bool
    ) -> list[Response]:
        req = self.ctx.req
        new_body = rewrite_model(body, doc, pick.target_model) if pick.target_model != request.model else None
        mutation, metadata = self._destination(
            pick, request, body_len=len(new_body) if new_body is not None else len(body)
        )
        if req.mode is BodySendMode.FULL_DUPLEX_STREAMED:
            return [
                responses.request_headers_response(mutation, metadata, clear_route_cache=True),
                *responses.streamed_body(Phase.REQUEST_BODY, new_body if new_body is not None else body, end_of_stream),
            ]
        return [responses.request_body_response(mutation, metadata, body=new_body, clear_route_cache=True)]

    def _destination(
        self, pick: Pick, request: InferenceRequest | None, body_len: int | None = None
    ) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """Account the pick and build the destination header + ``envoy.lb`` metadata."""
        ctx = self.ctx
        # ORIGINAL_DST clusters read the header and cannot parse a list, so the header
        # carries the primary only; the metadata carries primary + fallbacks.
        headers = {DESTINATION_HEADER: pick.primary.address}
        if REQUEST_ID_HEADER not in ctx.req.headers:
            headers[REQUEST_ID_HEADER] = ctx.request_id
        if body_len is not None:
            headers["content-length"] = str(body_len)
        if pick.mirror is not None:
            headers[MIRROR_HEADER] = pick.mirror.address
        ctx.req.state = RequestState.ROUTED
        ctx.request = request
        ctx.target_model = pick.target_model
        ctx.ticket = self._router.acquire(pick, request.prompt_tokens if request else 0)
        if request is not None:
            ctx.series = series = self._metrics.series(ctx.model, ctx.target_model)
            series.requests.inc()
            series.running.inc()
        addresses = ",".join(e.address for e in pick.endpoints)
        return headers, {LB_NAMESPACE: {DESTINATION_HEADER: addresses}}

    def _pass_request_chunk(self, chunk: bytes, end_of_stream: bool) -> list[Response]:
        if self.ctx.req.mode is BodySendMode.FULL_DUPLEX_STREAMED:
            return responses.streamed_replies(Phase.REQUEST_BODY, chunk, end_of_stream)
        return [responses.request_body_response()]

    # ---- response path -------------------------------------------------------------------
    def _note_served(self, message: Any) -> None:
        """Move the in-flight claim to the endpoint Envoy reports it actually used."""
        ticket = self.ctx.ticket
        if ticket is None:
            return
        served = _metadata_value(message, LB_NAMESPACE, SERVED_KEY)
        if not isinstance(served, str) or not served:
            return
        self.ctx.resp.served = served
        if self._router.move(ticket, served):
            log.debug("envoy served %s instead of the pick", served)

    def on_response_headers(self, message: Any) -> list[Response]:
        ctx, resp = self.ctx, self.ctx.resp
        resp.state = ResponseState.STREAMING
        headers = _header_map(message.response_headers, _RESPONSE_KEYS)
        status = headers.get(":status", "0")
        resp.status = int(status) if status.isdigit() else 0
        if resp.status == 404 and ctx.request is not None and ctx.ticket is not None:
            # the pod does not have the model (an adapter unloaded since its last /v1/models read):
            # have the scraper read its /v1/models again now, so the next requests go elsewhere
            self._router.not_served_by(ctx.ticket.address)
        remove: list[str] = []
        body_mode: BodySendMode | None = None
        if ctx.request is not None and ctx.target_model and ctx.target_model != ctx.model:
            resp.restorer = ModelNameRestorer(ctx.target_model, ctx.model)
            if resp.mode is BodySendMode.NONE:
                # the lean wiring sends no response body: ask for this one, to restore the name
                body_mode = resp.mode = BodySendMode.STREAMED
            if "content-length" in headers and resp.mode is not BodySendMode.BUFFERED:
                remove.append("content-length")  # the restored name may change the length
        if resp.mode is not BodySendMode.NONE:
            sse = "text/event-stream" in headers.get("content-type", "") or (
                ctx.request is not None and ctx.request.stream
            )
            resp.usage = UsageParser(sse=sse)
        echo = {TEST_SERVED_HEADER: resp.served} if self._hooks and resp.served else None
        if message.response_headers.end_of_stream:
            self._finish_response()
        return [responses.response_headers_response(echo, remove=remove, body_mode=body_mode)]

    def on_response_body(self, chunk: bytes, end_of_stream: bool) -> list[Response]:
        resp = self.ctx.resp
        if resp.usage is not None:
            resp.usage.feed(chunk)
        # a BUFFERED body is the whole body even when trailers follow (end_of_stream false)
        whole = end_of_stream or resp.mode is BodySendMode.BUFFERED
        out = resp.restorer.feed(chunk, whole) if resp.restorer else chunk
        if end_of_stream:
            self._finish_response()
        if resp.mode is BodySendMode.FULL_DUPLEX_STREAMED:
            return responses.streamed_replies(Phase.RESPONSE_BODY, out, end_of_stream)
        if out is chunk:
            return [responses.response_body_response()]
        extra = {"content-length": str(len(out))} if resp.mode is BodySendMode.BUFFERED else None
        return [responses.response_body_response(out, extra)]

    def on_response_trailers(self) -> list[Response]:
        out: list[Response] = []
        resp = self.ctx.resp
        if resp.restorer is not None and resp.mode is BodySendMode.FULL_DUPLEX_STREAMED:
            held = resp.restorer.pending()  # the body ended without end_of_stream: trailers end it
            if held:
                out += responses.streamed_body(Phase.RESPONSE_BODY, held, False)
        self._finish_response()
        out.append(responses.trailers_response(Phase.RESPONSE_TRAILERS))
        return out

    def _finish_response(self) -> None:
        ctx, resp = self.ctx, self.ctx.resp
        if resp.state is ResponseState.DONE:
            return
        resp.state = ResponseState.DONE
        series = ctx.series
        if series is not None:
            elapsed = self._clock() - ctx.started
            series.duration.observe(elapsed)
            usage = resp.usage.finish() if resp.usage else None
            if usage is not None:
                series.input_tokens.observe(usage.prompt_tokens)
                series.output_tokens.observe(usage.completion_tokens)
            if resp.status >= 400:
                self._metrics.request_error_total.labels(ctx.model, ctx.target_model, str(resp.status)).inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "done model=%s target=%s endpoint=%s status=%s duration=%.3fs",
                    ctx.model,
                    ctx.target_model,
                    ctx.ticket.address if ctx.ticket else "-",
                    resp.status,
                    elapsed,
                )
        self._release()

    def _release(self) -> None:
        ticket = self.ctx.ticket
        if ticket is not None and ticket.release() and self.ctx.series is not None:
            self.ctx.series.running.dec()

    # ---- errors and end of stream ------------------------------------------------------
    def _reject(self, rejected: Rejected) -> Response:
        ctx = self.ctx
        self.finished = True
        self._metrics.rejections_total.labels(rejected.reason).inc()
        self._metrics.request_error_total.labels(ctx.model, ctx.target_model, rejected.reason).inc()
        log.info("rejected %s: %s", rejected.http_status, rejected.message)
        self._release()
        extra = {} if REQUEST_ID_HEADER in ctx.req.headers else {REQUEST_ID_HEADER: ctx.request_id}
        return responses.immediate_response(rejected, extra)

    def close(self, *, cancelled: bool = False, failed: bool = False) -> None:
        """End of the gRPC stream (normal, error or cancellation): release exactly once.

        Whether the request was cut off is read from what the stream saw, not from how it
        ended (``cancelled``: a reset, Envoy's default; a clean half-close with its runtime
        ``ext_proc_graceful_grpc_close``, which ``epp envoy-config``'s own wirings set).  A
        request cut off by epp's own failure (``failed``) counts as ``Internal``, one already
        answered with an immediate response counts only as that."""
        if self._closed:
            return
        self._closed = True
        ctx = self.ctx
        if ctx.ticket is not None and ctx.resp.state is not ResponseState.DONE:
            # Cut off before its end: before any response, or mid-body where a body comes to epp.
            # In the lean wiring (no response body) the stream's close after the headers *is* the end.
            cut = not ctx.resp.status or ctx.resp.mode is not BodySendMode.NONE
            if cut and ctx.series is not None and not self.finished:
                reason = "Internal" if failed else "Cancelled"
                self._metrics.request_error_total.labels(ctx.model, ctx.target_model, reason).inc()
                log.debug("request cut off (stream %s)", "failed" if failed else "reset" if cancelled else "closed")
            if ctx.resp.status:
                self._finish_response()
        self._release()  # also a claim taken after the response ended (an out-of-order stream)
