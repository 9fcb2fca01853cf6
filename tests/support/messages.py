"""The ext_proc messages Envoy sends (builders), what epp answers (readers), and a thin client."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import json_format, struct_pb2

FULL_DUPLEX = 4
BUFFERED = 2


def _metadata(metadata: Mapping[str, Mapping[str, Any]] | None) -> Any:
    md = base_pb2.Metadata()
    for ns, values in (metadata or {}).items():
        s = struct_pb2.Struct()
        s.update(dict(values))
        md.filter_metadata[ns].CopyFrom(s)
    return md


def _http_headers(headers: Mapping[str, str], end_of_stream: bool) -> Any:
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=end_of_stream)


def request_headers(
    headers: Mapping[str, str] | None = None,
    *,
    path: str = "/v1/completions",
    method: str = "POST",
    end_of_stream: bool = False,
    mode: int | None = FULL_DUPLEX,
    response_mode: int | None = None,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> Any:
    all_headers = {":method": method, ":path": path, ":authority": "gw", ":scheme": "http", **(headers or {})}
    msg = pb.ProcessingRequest(
        request_headers=_http_headers(all_headers, end_of_stream), metadata_context=_metadata(metadata)
    )
    if mode is not None:
        msg.protocol_config.request_body_mode = mode
        msg.protocol_config.response_body_mode = mode if response_mode is None else response_mode
    return msg


def request_body(body: bytes, end_of_stream: bool = True) -> Any:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def request_trailers() -> Any:
    return pb.ProcessingRequest(request_trailers=pb.HttpTrailers())


def response_headers(
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    *,
    end_of_stream: bool = False,
    served: str | None = None,
) -> Any:
    all_headers = {":status": str(status), **(headers or {})}
    return pb.ProcessingRequest(
        response_headers=_http_headers(all_headers, end_of_stream),
        metadata_context=_metadata({"envoy.lb": {"x-gateway-destination-endpoint-served": served}} if served else None),
    )


def response_body(body: bytes, end_of_stream: bool = False) -> Any:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def response_trailers() -> Any:
    return pb.ProcessingRequest(response_trailers=pb.HttpTrailers())


def set_headers(response: Any) -> dict[str, str]:
    """The headers a ProcessingResponse sets (headers, body or immediate response)."""
    kind = response.WhichOneof("response")
    part = getattr(response, kind)
    mutation = part.headers if kind == "immediate_response" else part.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() or h.header.value for h in mutation.set_headers}


def lb_metadata(response: Any) -> dict[str, Any]:
    return json_format.MessageToDict(response.dynamic_metadata) if response.HasField("dynamic_metadata") else {}


class ExtProcClient:
    """A thin ext_proc client: open a stream, send messages, read replies."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = pb_grpc.ExternalProcessorStub(channel)

    def open(self) -> Any:
        return self.stub.Process()

    async def send(self, call: Any, message: Any, replies: int) -> list[Any]:
        await call.write(message)
        return [await call.read() for _ in range(replies)]

    async def run(self, messages: list[Any]) -> list[Any]:
        """Send everything, half-close, collect all replies until the stream ends."""
        call = self.stub.Process()
        for m in messages:
            await call.write(m)
        await call.done_writing()
        out = []
        while (r := await call.read()) != grpc.aio.EOF:
            out.append(r)
        return out
