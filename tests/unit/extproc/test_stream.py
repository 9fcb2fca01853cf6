"""``ExtProcStream.handle()`` driven directly (no gRPC), one table row per conversation, for the
three wirings epp renders: lean (BUFFERED request, response headers only), buffered (response
STREAMED) and full duplex.  Each row: the messages Envoy sends, the reply kinds epp must send
back for each, and what the load ledger holds once the response is complete."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from epp.domain import Endpoint
from epp.extproc.stream import ExtProcStream, RequestState, ResponseState
from epp.observability.metrics import EppMetrics
from epp.routing import Router
from epp.scheduling.scheduler import build_scheduler

from support import datastore
from support import messages as m

EPS = [Endpoint("127.0.0.1:8001", "a"), Endpoint("127.0.0.1:8002", "b")]
BUFFERED, STREAMED, FULL_DUPLEX, NONE = 2, 1, 4, 0  # ProcessingMode.BodySendMode
BODY = orjson.dumps({"model": "m", "prompt": "hello world", "max_tokens": 5})
SSE = b'data: {"model":"m-target","choices":[{"text":"hi"}]}\n\n'


def stream() -> tuple[ExtProcStream, Any]:
    store = datastore(EPS)
    router = Router(store, build_scheduler("least-inflight", store, rng=random.Random(1)))
    return ExtProcStream(router, EppMetrics(CollectorRegistry()), max_body_bytes=1 << 20), store


def kinds(replies: list[Any]) -> list[str]:
    out = []
    for r in replies:
        kind = r.WhichOneof("response")
        body = getattr(r, kind) if kind in ("request_body", "response_body") else None
        if body is not None and body.response.body_mutation.HasField("streamed_response"):
            kind += "/streamed"
        out.append(kind)
    return out


def headers(mode: int, response_mode: int, **kw: Any) -> Any:
    return m.request_headers({"content-length": str(len(BODY))}, mode=mode, response_mode=response_mode, **kw)


ROWS = [
    # id, messages, reply kinds per message, claims once done
    ("lean-json", [headers(BUFFERED, NONE), m.request_body(BODY), m.response_headers(200)],
     [["request_headers"], ["request_body"], ["response_headers"]], 1),  # lean: the stream's close ends it
    ("lean-headers-only-response", [headers(BUFFERED, NONE), m.request_body(BODY),
                                    m.response_headers(200, end_of_stream=True)],
     [["request_headers"], ["request_body"], ["response_headers"]], 0),
    ("buffered-json", [headers(BUFFERED, STREAMED), m.request_body(BODY), m.response_headers(200),
                       m.response_body(b'{"usage": {"prompt_tokens": 3}}', end_of_stream=True)],
     [["request_headers"], ["request_body"], ["response_headers"], ["response_body"]], 0),
    ("full-duplex-sse", [headers(FULL_DUPLEX, FULL_DUPLEX), m.request_body(BODY[:9], end_of_stream=False),
                         m.request_body(BODY[9:], end_of_stream=True),
                         m.response_headers(200, {"content-type": "text/event-stream"}),
                         m.response_body(SSE), m.response_body(b"", end_of_stream=True)],
     [[], [], ["request_headers", "request_body/streamed"], ["response_headers"], ["response_body/streamed"],
      ["response_body/streamed"]], 0),
    ("full-duplex-trailers-end-it", [headers(FULL_DUPLEX, FULL_DUPLEX), m.request_body(BODY, end_of_stream=True),
                                     m.response_headers(200), m.response_body(SSE), m.response_trailers()],
     [[], ["request_headers", "request_body/streamed"], ["response_headers"], ["response_body/streamed"],
      ["response_trailers"]], 0),
    ("get-routed-on-headers", [m.request_headers(method="GET", path="/v1/models", end_of_stream=True,
                                                 mode=BUFFERED, response_mode=NONE), m.response_headers(200)],
     [["request_headers"], ["response_headers"]], 1),
    ("empty-model-rejected", [headers(BUFFERED, NONE),
                                m.request_body(orjson.dumps({"model": "", "prompt": "x"}))],
     [["request_headers"], ["immediate_response"]], 0),
    ("body-less-post-rejected", [m.request_headers(end_of_stream=True, mode=BUFFERED, response_mode=NONE)],
     [["immediate_response"]], 0),
]


@pytest.mark.parametrize(("messages", "expected", "claims"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_each_message_gets_the_replies_of_its_wiring(messages, expected, claims):
    s, store = stream()
    got = [kinds(s.handle(message)) for message in messages]
    assert got == expected
    assert store.load.total_inflight() == claims
    s.close(cancelled=True)  # the stream's end, whichever way: nothing stays claimed
    assert store.load.total_inflight() == 0


def test_the_states_of_both_directions_follow_the_messages():
    s, store = stream()
    assert (s.ctx.req.state, s.ctx.resp.state) == (RequestState.HEADERS, ResponseState.PENDING)
    s.handle(headers(BUFFERED, NONE))
    assert s.ctx.req.state is RequestState.BODY
    s.handle(m.request_body(BODY))
    assert s.ctx.req.state is RequestState.ROUTED and store.load.total_inflight() == 1
    s.handle(m.response_headers(200))
    assert s.ctx.resp.state is ResponseState.STREAMING and s.ctx.resp.status == 200
    s.close(cancelled=True)
    assert s.ctx.resp.state is ResponseState.DONE and store.load.total_inflight() == 0


@pytest.mark.parametrize(("response_mode", "cut"), [(NONE, False), (FULL_DUPLEX, True)], ids=["lean", "full-duplex"])
def test_a_stream_closed_after_the_response_headers_is_an_error_only_where_a_body_was_due(response_mode, cut):
    s, _ = stream()
    request_mode = FULL_DUPLEX if response_mode == FULL_DUPLEX else BUFFERED
    for message in (headers(request_mode, response_mode), m.request_body(BODY), m.response_headers(200)):
        s.handle(message)
    s.close(cancelled=True)  # lean: the normal end; full duplex: the body was cut off
    assert _cancelled(s) == (1 if cut else 0)


def _errors(s: ExtProcStream) -> dict[str, float]:
    """The stream's ``inference_model_request_error_total`` by error code (one model per stream)."""
    samples = (x for metric in s._metrics.registry.collect() if metric.name == "inference_model_request_error"
               for x in metric.samples if x.name.endswith("_total"))  # fmt: skip
    return {x.labels["error_code"]: x.value for x in samples}


def _cancelled(s: ExtProcStream) -> float:
    """The stream's ``inference_model_request_error_total{error_code="Cancelled"}``."""
    return _errors(s).get("Cancelled", 0.0)


@pytest.mark.parametrize("cancelled", [True, False], ids=["reset", "graceful-close"])
def test_how_the_stream_ends_does_not_change_what_the_request_was(cancelled):
    """Envoy resets the stream by default and half-closes it with ``ext_proc_graceful_grpc_close``
    (epp's bootstraps): either way a request with no response yet was cut off, and a lean one
    past its response headers is complete."""
    cut, _ = stream()
    for message in (headers(BUFFERED, NONE), m.request_body(BODY)):
        cut.handle(message)
    cut.close(cancelled=cancelled)
    assert _cancelled(cut) == 1 and cut.ctx.resp.state is not ResponseState.DONE  # no response: nothing observed
    done, store = stream()
    for message in (headers(BUFFERED, NONE), m.request_body(BODY), m.response_headers(200)):
        done.handle(message)
    done.close(cancelled=cancelled)
    assert _cancelled(done) == 0 and done.ctx.resp.state is ResponseState.DONE and store.load.total_inflight() == 0


def test_a_request_cut_off_by_epps_own_failure_is_internal_not_cancelled():
    s, store = stream()
    for message in (headers(BUFFERED, NONE), m.request_body(BODY)):
        s.handle(message)
    s.close(failed=True)  # the servicer's handler raised
    assert _errors(s) == {"Internal": 1} and store.load.total_inflight() == 0


def test_a_request_rejected_after_routing_counts_once():
    s, store = stream()
    for message in (headers(BUFFERED, NONE), m.request_body(BODY)):
        s.handle(message)
    assert kinds(s.handle(headers(BUFFERED, NONE))) == ["immediate_response"]  # headers twice: a client, not Envoy
    s.close()
    assert _errors(s) == {"BadRequest": 1} and store.load.total_inflight() == 0


def _served_metadata(message: Any, address: str) -> Any:
    message.metadata_context.filter_metadata["envoy.lb"].fields[
        "x-gateway-destination-endpoint-served"
    ].string_value = address
    return message


@pytest.mark.parametrize("first", ["response_headers", "response_body"])
def test_the_claim_follows_the_endpoint_envoy_reports_on_the_first_response_message(first):
    # Envoy has picked the host before the response starts and forwards the same metadata on every
    # message; epp reads it once, from whichever response message comes first (headers may be skipped)
    s, store = stream()
    s.handle(headers(FULL_DUPLEX, FULL_DUPLEX))
    s.handle(m.request_body(BODY, end_of_stream=True))
    picked = s.ctx.ticket.address
    other = next(e.address for e in EPS if e.address != picked)
    head = m.response_headers(200) if first == "response_headers" else m.response_body(SSE)
    s.handle(_served_metadata(head, other))
    assert s.ctx.ticket.address == other and store.load.inflight(other) == 1 and store.load.inflight(picked) == 0
    s.handle(_served_metadata(m.response_body(SSE), picked))  # later messages do not move it again
    assert s.ctx.ticket.address == other
    s.handle(m.response_body(b"", end_of_stream=True))
    assert store.load.total_inflight() == 0
