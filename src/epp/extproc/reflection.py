"""gRPC server reflection that also resolves method symbols, so ghz and grpcurl work without a protoset.

grpcio-reflection answers ``file_containing_symbol`` with
``DescriptorPool.FindFileContainingSymbol``.  On the upb protobuf backend (protobuf ≥ 4,
the one installed) that lookup knows messages, enums, services and extensions but not a
service's methods: ``envoy.service.ext_proc.v3.ExternalProcessor.Process`` raises
``KeyError``, so the stock servicer answers NOT_FOUND.  Reflection clients resolve a call
``pkg.Service/Method`` by asking for exactly that symbol (ghz: ``Symbol not found: …Process``).
The gRPC C++ and Go servers resolve it to the file that declares the service; this servicer
does the same and leaves every other answer to grpcio-reflection.

grpcio-reflection serves only ``grpc.reflection.v1alpha.ServerReflection``; clients that
try ``v1`` first (ghz, grpcurl) fall back to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection as _stock
from grpc_reflection.v1alpha import reflection_pb2_grpc

__all__ = ["SERVICE_NAME", "ReflectionServicer", "enable_server_reflection"]

SERVICE_NAME: str = _stock.SERVICE_NAME


class ReflectionServicer(_stock.aio.ReflectionServicer):  # type: ignore[misc]
    """grpcio-reflection's asyncio servicer, plus ``pkg.Service.Method`` → the service's file."""

    def __init__(self, service_names: Iterable[str], pool: Any = None) -> None:
        super().__init__(service_names, pool=pool)
        self._descriptors = descriptor_pool.Default() if pool is None else pool

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        answer = super()._file_containing_symbol(request, fully_qualified_name)
        if not answer.HasField("error_response"):
            return answer
        service_name, _, method = fully_qualified_name.rpartition(".")
        try:
            service = self._descriptors.FindServiceByName(service_name)
        except KeyError:
            return answer
        if method not in service.methods_by_name:
            return answer
        return super()._file_containing_symbol(request, service.full_name)


def enable_server_reflection(service_names: Iterable[str], server: Any, pool: Any = None) -> None:
    """Serve reflection for ``service_names`` on a ``grpc.aio`` server (the stock function's signature)."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionServicer(service_names, pool=pool), server)
