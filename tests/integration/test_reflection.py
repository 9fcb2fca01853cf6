"""Server reflection on a real in-process App, over real gRPC, as ghz and grpcurl use it.

The point is the method symbol: a client resolving the call
``envoy.service.ext_proc.v3.ExternalProcessor/Process`` asks for the file containing
``envoy.service.ext_proc.v3.ExternalProcessor.Process``, which grpcio-reflection alone
answers NOT_FOUND (``epp.extproc.reflection`` explains why).  Both servers are checked:
the TCP port and the Unix socket (the sidecar shape).  grpcio-reflection serves only the
v1alpha protocol (no ``grpc.reflection.v1``), so that is the one driven here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
METHOD = f"{SERVICE}.Process"
FILE = "envoy/service/ext_proc/v3/external_processor.proto"
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]



@pytest.fixture(params=["tcp", "unix"])
async def target(request, write_pool, start_app, socket_dir) -> str:
    """The address of one of an App's reflection-serving ext_proc servers."""
    pool = write_pool(["127.0.0.1:18001"])
    if request.param == "tcp":
        app = await start_app(pool)
        return f"127.0.0.1:{app.grpc_port}"
    sock = f"unix://{socket_dir / 'epp.sock'}"
    await start_app(pool, grpc_address=sock)
    return sock


async def ask(target: str, *requests: reflection_pb2.ServerReflectionRequest) -> list:
    """Send ``requests`` on one reflection stream; one answer per request, in order."""

    async def gen() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        for r in requests:
            yield r

    async with grpc.aio.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = [a async for a in stub.ServerReflectionInfo(gen())]
    assert len(answers) == len(requests)
    return answers


def files_of(answer) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
    files = {}
    for raw in answer.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[proto.name] = proto
    return files


def methods_declared(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> set[str]:
    return {
        f"{proto.package}.{service.name}.{method.name}"
        for proto in files.values()
        for service in proto.service
        for method in service.method
    }


@pytest.mark.parametrize(
    "symbol",
    [METHOD, SERVICE, "envoy.service.ext_proc.v3.ProcessingRequest"],
    ids=["method", "service", "message"],
)
async def test_a_symbol_resolves_to_the_ext_proc_file_and_its_imports(target, symbol):
    (answer,) = await ask(target, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    files = files_of(answer)
    assert FILE in files
    assert METHOD in methods_declared(files)
    # the transitive imports come along, so a client can build every message type of the call
    assert "envoy/config/core/v3/base.proto" in files
    assert set(files[FILE].dependency) <= set(files)


async def test_the_file_resolves_by_name(target):
    (answer,) = await ask(target, reflection_pb2.ServerReflectionRequest(file_by_filename=FILE))
    files = files_of(answer)
    assert METHOD in methods_declared(files)


@pytest.mark.parametrize(
    "symbol",
    ["envoy.service.ext_proc.v3.ExternalProcessor.NoSuchMethod", "no.such.Service.Process", "no.such.Symbol", ""],
    ids=["unknown-method-of-a-known-service", "unknown-service", "unknown-symbol", "empty"],
)
async def test_an_unknown_symbol_is_not_found(target, symbol):
    (answer,) = await ask(target, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    assert answer.WhichOneof("message_response") == "error_response"
    assert answer.error_response.error_code == NOT_FOUND


async def test_services_are_listed_and_one_stream_answers_in_order(target):
    listed, method, missing = await ask(
        target,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=METHOD),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
    )
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert method.original_request.file_containing_symbol == METHOD
    assert FILE in files_of(method)
    assert missing.error_response.error_code == NOT_FOUND
