"""Names from Envoy's ext_proc API (the EPP protocol's own header and metadata names are in ``epp.wire``)."""

from __future__ import annotations

import enum

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
