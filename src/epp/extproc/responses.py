"""Typed builders of ext_proc ``ProcessingResponse`` messages.

The xds-protos stubs are untyped; this module is the one place that touches their
constructors, so the rest of epp deals in plain Python values.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from epp.errors import Rejected
from epp.extproc.protocol import MAX_CHUNK_BYTES

ProcessingResponse = Any  # envoy.service.ext_proc.v3.ProcessingResponse (untyped stub)

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _set_mutation(mutation: Any, set_headers: Mapping[str, str], remove: Sequence[str] = ()) -> None:
    add = mutation.set_headers.add
    for key, value in set_headers.items():
        option = add()
        option.header.key = key
        option.header.raw_value = value.encode()
        option.append_action = _OVERWRITE
    if remove:
        mutation.remove_headers.extend(remove)


def _header_mutation(set_headers: Mapping[str, str], remove: Sequence[str] = ()) -> Any:
    mutation = pb.HeaderMutation()
    _set_mutation(mutation, set_headers, remove)
    return mutation


def _set_metadata(reply: Any, metadata: Mapping[str, Mapping[str, str]] | None) -> None:
    if not metadata:
        return
    namespaces = reply.dynamic_metadata.fields
    for namespace, values in metadata.items():
        fields = namespaces[namespace].struct_value.fields
        for key, value in values.items():
            fields[key].string_value = value


def _fill(
    part: Any,
    set_headers: Mapping[str, str] | None = None,
    *,
    remove: Sequence[str] = (),
    body: bytes | None = None,
    clear_route_cache: bool = False,
) -> None:
    """Fill the ``CommonResponse`` of a headers or body reply in place (this runs on every
    message: nested constructors would build and copy each level again)."""
    part.SetInParent()
    if not (set_headers or remove or body is not None or clear_route_cache):
        return
    common = part.response
    if clear_route_cache:
        common.clear_route_cache = True
    if set_headers or remove:
        _set_mutation(common.header_mutation, set_headers or {}, remove)
    if body is not None:
        common.body_mutation.body = body


def request_headers_response(
    set_headers: Mapping[str, str] | None = None,
    metadata: Mapping[str, Mapping[str, str]] | None = None,
    *,
    clear_route_cache: bool = False,
) -> ProcessingResponse:
    """Answer ``request_headers``; carries the routing decision in full-duplex mode."""
    reply = pb.ProcessingResponse()
    _fill(reply.request_headers, set_headers, clear_route_cache=clear_route_cache and bool(set_headers))
    _set_metadata(reply, metadata)
    return reply


def request_body_response(
    set_headers: Mapping[str, str] | None = None,
    metadata: Mapping[str, Mapping[str, str]] | None = None,
    *,
    body: bytes | None = None,
    clear_route_cache: bool = False,
) -> ProcessingResponse:
    """Answer a BUFFERED request body: headers, body replacement and metadata in one message."""
    reply = pb.ProcessingResponse()
    _fill(reply.request_body, set_headers, body=body, clear_route_cache=clear_route_cache and bool(set_headers))
    _set_metadata(reply, metadata)
    return reply


def response_headers_response(
    set_headers: Mapping[str, str] | None = None, remove: Sequence[str] = (), *, body_mode: int | None = None
) -> ProcessingResponse:
    """Answer ``response_headers``; ``body_mode`` asks Envoy to send this response's body after all
    (``mode_override``: honoured when the filter allows overrides and no direction is full-duplex)."""
    reply = pb.ProcessingResponse()
    _fill(reply.response_headers, set_headers, remove=remove)
    if body_mode is not None:
        reply.mode_override.response_body_mode = body_mode
    return reply


def response_body_response(
    body: bytes | None = None, set_headers: Mapping[str, str] | None = None
) -> ProcessingResponse:
    """Answer a STREAMED/BUFFERED response body chunk (``body`` replaces the chunk when given)."""
    reply = pb.ProcessingResponse()
    _fill(reply.response_body, set_headers, body=body)
    return reply


def streamed_replies(phase: str, body: bytes, end_of_stream: bool) -> list[ProcessingResponse]:
    """:func:`streamed_body` as a list; a chunk that fits one reply (every response chunk Envoy
    sends) skips the generator."""
    if len(body) > MAX_CHUNK_BYTES:
        return list(streamed_body(phase, body, end_of_stream))
    reply = pb.ProcessingResponse()
    streamed = getattr(reply, phase).response.body_mutation.streamed_response
    streamed.body = body
    streamed.end_of_stream = end_of_stream
    return [reply]


def streamed_body(phase: str, body: bytes, end_of_stream: bool) -> Iterator[ProcessingResponse]:
    """Full-duplex body replies: ``body`` in chunks of at most 62,000 bytes, EoS on the last.

    Fields are assigned in place on one message: nested constructors would copy the
    chunk once per level (this runs for every response chunk in full-duplex).
    """
    if len(body) <= MAX_CHUNK_BYTES:
        reply = pb.ProcessingResponse()
        streamed = getattr(reply, phase).response.body_mutation.streamed_response
        streamed.body = body
        streamed.end_of_stream = end_of_stream
        yield reply
        return
    last = (len(body) - 1) // MAX_CHUNK_BYTES * MAX_CHUNK_BYTES
    for start in range(0, len(body), MAX_CHUNK_BYTES):
        reply = pb.ProcessingResponse()
        streamed = getattr(reply, phase).response.body_mutation.streamed_response
        streamed.body = body[start : start + MAX_CHUNK_BYTES]
        streamed.end_of_stream = end_of_stream and start == last
        yield reply


def trailers_response(phase: str) -> ProcessingResponse:
    return pb.ProcessingResponse(**{phase: pb.TrailersResponse()})


def error_body(rejected: Rejected) -> bytes:
    """An OpenAI-style error document."""
    return orjson.dumps(
        {
            "error": {
                "message": rejected.message,
                "type": rejected.error_type,
                "param": None,
                "code": rejected.http_status,
            }
        }
    )


def immediate_response(rejected: Rejected, extra_headers: Mapping[str, str] | None = None) -> ProcessingResponse:
    """The one place a ``Rejected`` becomes an HTTP answer."""
    headers = {"content-type": "application/json", **(extra_headers or {})}
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=rejected.http_status),
            headers=_header_mutation(headers),
            body=error_body(rejected),
            details=f"epp_{rejected.reason}",
        )
    )
