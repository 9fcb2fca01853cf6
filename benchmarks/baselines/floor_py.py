"""The Python floor: the least ext_proc server that can route, on bare grpc.aio + uvloop.

Benchmark tooling, not product code, and on purpose no epp import: this is what any
Python picker pays for the transport alone, the row epp is compared with.  It only sets
the destination header (round-robin over ``--endpoints``) and writes the same
``envoy.lb`` metadata epp writes, in the same wiring as epp, following the body modes
Envoy names in the first message's ``protocol_config``:

- request headers with end_of_stream (or request body mode NONE/STREAMED): the headers
  reply carries the destination (``clear_route_cache``);
- BUFFERED request body: headers CONTINUE at once, the body reply carries the destination;
- FULL_DUPLEX_STREAMED request body: the headers reply waits for the end of the body, then
  goes out with the destination, followed by the body echoed as ``streamed_response``;
- response headers: CONTINUE; response body: echoed chunk by chunk in FULL_DUPLEX_STREAMED,
  CONTINUE otherwise; trailers: an empty trailers reply; stream end: nothing.

The Go floor (``floor_go/main.go``) behaves the same; ``build.py --selftest`` checks both.

    python benchmarks/baselines/floor_py.py --address 127.0.0.1:0 --endpoints 127.0.0.1:8001,127.0.0.1:8002

Once listening it prints one line on stdout, ``{"event": "ready", "port": N}``.

It runs on epp's transport settings: the same server options and, unless the environment
names its own, the same ``GRPC_EXPERIMENTS`` default (``-event_engine_listener``, set before
grpc loads, as ``epp.grpcenv`` does for epp; copied here because the floors import nothing of
epp).  ``GRPC_EXPERIMENTS= python floor_py.py ...`` runs it on grpc's stock transport.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_listener")  # epp's default (epp.grpcenv), before grpc loads

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
MAX_CHUNK_BYTES = 62_000  # what one streamed_response may carry back to Envoy
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
ROUTE_ON_HEADERS = (processing_mode_pb2.ProcessingMode.NONE, processing_mode_pb2.ProcessingMode.STREAMED)
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_GRPC_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)]


def _destination(endpoint: str, content_length: int | None = None) -> tuple[Any, Any]:
    """The CommonResponse carrying the destination header, and the ``envoy.lb`` metadata."""
    common = pb.CommonResponse(clear_route_cache=True)
    headers = [(DESTINATION_HEADER, endpoint)]
    if content_length is not None:
        headers.append(("content-length", str(content_length)))
    for key, value in headers:
        option = common.header_mutation.set_headers.add()
        option.header.key = key
        option.header.raw_value = value.encode()
        option.append_action = _OVERWRITE
    metadata = struct_pb2.Struct()
    metadata.update({LB_NAMESPACE: {DESTINATION_HEADER: endpoint}})
    return common, metadata


def _streamed(phase: str, body: bytes, end_of_stream: bool) -> Iterator[Any]:
    chunks = [body[i : i + MAX_CHUNK_BYTES] for i in range(0, len(body), MAX_CHUNK_BYTES)] or [b""]
    for i, chunk in enumerate(chunks):
        response = pb.ProcessingResponse()
        streamed = getattr(response, phase).response.body_mutation.streamed_response
        streamed.body = chunk
        streamed.end_of_stream = end_of_stream and i == len(chunks) - 1
        yield response


class FloorServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, endpoints: list[str]) -> None:
        self._next = itertools.cycle(endpoints).__next__

    async def Process(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        request_mode = response_mode = processing_mode_pb2.ProcessingMode.BUFFERED
        first = True
        routed = False
        chunks: list[bytes] = []
        async for message in request_iterator:
            if first:
                first = False
                if message.HasField("protocol_config"):
                    request_mode = message.protocol_config.request_body_mode
                    response_mode = message.protocol_config.response_body_mode
            phase = message.WhichOneof("request")
            if phase == "request_headers":
                if message.request_headers.end_of_stream or request_mode in ROUTE_ON_HEADERS:
                    routed = True
                    common, metadata = _destination(self._next())
                    yield pb.ProcessingResponse(
                        request_headers=pb.HeadersResponse(response=common), dynamic_metadata=metadata
                    )
                elif request_mode != FULL_DUPLEX:
                    yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            elif phase == "request_body":
                body = message.request_body
                if request_mode == FULL_DUPLEX:
                    if routed:
                        for response in _streamed("request_body", body.body, body.end_of_stream):
                            yield response
                        continue
                    chunks.append(body.body)
                    if body.end_of_stream:
                        routed = True
                        for response in self._route_full_duplex(chunks, end_of_stream=True):
                            yield response
                        chunks = []
                elif routed:
                    yield pb.ProcessingResponse(request_body=pb.BodyResponse())
                else:
                    routed = True
                    common, metadata = _destination(self._next())
                    yield pb.ProcessingResponse(
                        request_body=pb.BodyResponse(response=common), dynamic_metadata=metadata
                    )
            elif phase == "request_trailers":
                if request_mode == FULL_DUPLEX and not routed:
                    routed = True
                    for response in self._route_full_duplex(chunks, end_of_stream=False):
                        yield response
                    chunks = []
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
            elif phase == "response_headers":
                yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
            elif phase == "response_body":
                if response_mode == FULL_DUPLEX:
                    for response in _streamed(
                        "response_body", message.response_body.body, message.response_body.end_of_stream
                    ):
                        yield response
                else:
                    yield pb.ProcessingResponse(response_body=pb.BodyResponse())
            elif phase == "response_trailers":
                yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

    def _route_full_duplex(self, chunks: list[bytes], *, end_of_stream: bool) -> Iterator[Any]:
        body = b"".join(chunks)
        common, metadata = _destination(self._next(), content_length=len(body))
        yield pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), dynamic_metadata=metadata)
        yield from _streamed("request_body", body, end_of_stream)


def _endpoints(text: str) -> list[str]:
    endpoints = [e.strip() for e in text.split(",") if e.strip()]
    for endpoint in endpoints:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"expected ip:port[,ip:port...], got {text!r}")
    if not endpoints:
        raise argparse.ArgumentTypeError("expected at least one ip:port")
    return endpoints


async def serve(address: str, endpoints: list[str]) -> None:
    server = grpc.aio.server(options=_GRPC_OPTIONS)
    pb_grpc.add_ExternalProcessorServicer_to_server(FloorServicer(endpoints), server)
    port = server.add_insecure_port(address)
    await server.start()
    print(json.dumps({"event": "ready", "port": port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:0", help="host:port to listen on (TCP, port 0 allowed)")
    parser.add_argument("--endpoints", type=_endpoints, required=True, help="ip:port[,ip:port...] (round-robin)")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.address, args.endpoints))
    return 0


if __name__ == "__main__":
    sys.exit(main())
