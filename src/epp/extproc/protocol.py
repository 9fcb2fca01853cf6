"""Wire names of the EPP protocol and of Envoy's ext_proc API."""

from __future__ import annotations

import enum

DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_SERVED_KEY = "x-gateway-destination-endpoint-served"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
MIRROR_HEADER = "x-gateway-mirror-endpoint"
REQUEST_ID_HEADER = "x-request-id"
OBJECTIVE_HEADER = "x-gateway-inference-objective"
# GIE re-chunks bodies at 62,000 bytes: under Envoy's recommended 64 KiB per message.
MAX_CHUNK_BYTES = 62_000


class Phase(enum.StrEnum):
    """Values equal the ``ProcessingRequest`` oneof field names."""

    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    REQUEST_TRAILERS = "request_trailers"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"
    RESPONSE_TRAILERS = "response_trailers"


class BodySendMode(enum.IntEnum):
    """``ProcessingMode.BodySendMode`` values."""

    NONE = 0
    STREAMED = 1
    BUFFERED = 2
    BUFFERED_PARTIAL = 3
    FULL_DUPLEX_STREAMED = 4
    GRPC = 5
