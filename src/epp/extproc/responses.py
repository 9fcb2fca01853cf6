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
from google.protobuf import struct_pb2

from epp.errors import Rejected
from epp.extproc.protocol import MAX_CHUNK_BYTES

ProcessingResponse = Any  # envoy.service.ext_proc.v3.ProcessingResponse (untyped stub)

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _header_mutation(set_headers: Mapping[str, str], remove: Sequence[str] = ()) -> Any:
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE
            )
            for k, v in set_headers.items()
        ],
        remove_headers=list(remove),
    )


def _struct(metadata: Mapping[str, Mapping[str, str]] | None) -> Any:
    if not metadata:
        return None
    s = struct_pb2.Struct()
    s.update({ns: dict(values) for ns, values in metadata.items()})
    return s


def _common(
    set_headers: Mapping[str, str] | None = None,
    *,
    remove: Sequence[str] = (),
    body: bytes | None = None,
    clear_route_cache: bool = False,
) -> Any:
    common = pb.CommonResponse(clear_route_cache=clear_route_cache)
    if set_headers or remove:
        common.header_mutation.CopyFrom(_header_mutation(set_headers or {}, remove))
    if body is not None:
        common.body_mutation.body = body
    return common


def request_headers_response(
    set_headers: Mapping[str, str] | None = None,
    metadata: Mapping[str, Mapping[str, str]] | None = None,
    *,
    clear_route_cache: bool = False,
) -> ProcessingResponse:
    """Answer ``request_headers``; carries the routing decision in full-duplex mode."""
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=_common(set_headers, clear_route_cache=clear_route_cache and bool(set_headers))
        ),
        dynamic_metadata=_struct(metadata),
    )


def request_body_response(
    set_headers: Mapping[str, str] | None = None,
    metadata: Mapping[str, Mapping[str, str]] | None = None,
    *,
    body: bytes | None = None,
    clear_route_cache: bool = False,
) -> ProcessingResponse:
    """Answer a BUFFERED request body: headers, body replacement and metadata in one message."""
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=_common(set_headers, body=body, clear_route_cache=clear_route_cache and bool(set_headers))
        ),
        dynamic_metadata=_struct(metadata),
    )


def response_headers_response(
    set_headers: Mapping[str, str] | None = None, remove: Sequence[str] = (), *, body_mode: int | None = None
) -> ProcessingResponse:
    """Answer ``response_headers``; ``body_mode`` asks Envoy to send this response's body after all
    (``mode_override``: honoured when the filter allows overrides and no direction is full-duplex)."""
    reply = pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=_common(set_headers, remove=remove)))
    if body_mode is not None:
        reply.mode_override.response_body_mode = body_mode
    return reply


def response_body_response(
    body: bytes | None = None, set_headers: Mapping[str, str] | None = None
) -> ProcessingResponse:
    """Answer a STREAMED/BUFFERED response body chunk (``body`` replaces the chunk when given)."""
    return pb.ProcessingResponse(response_body=pb.BodyResponse(response=_common(set_headers, body=body)))


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
