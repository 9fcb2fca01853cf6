"""The ext_proc message sequences ghz sends: one JSON array per HTTP request Envoy would process.

    python benchmarks/ghz/messages.py OUT_DIR [--sse-chunks 64] [--fixed-request-id]

writes three ghz data files (``-D FILE``; protobuf JSON, ``bytes`` fields in base64) and
prints their paths:

- ``lean-json.json``: the lean wiring (``epp envoy-config``'s default): ``protocol_config``
  BUFFERED request / NONE response + request headers, the request body (end of stream), the
  response headers; nothing more (the stream's end is the end of the request);
- ``two-json.json``: the fewest messages a routed request can cost (response headers SKIP
  as well): request headers and the request body; epp then learns neither the status nor
  the endpoint Envoy used, only the stream's end;
- ``buffered-json.json``: ``protocol_config`` BUFFERED both ways + request headers, the
  request body (end of stream), response headers, the JSON response body (end of stream);
- ``duplex-json.json``: the same with ``protocol_config`` FULL_DUPLEX_STREAMED both ways;
- ``duplex-sse.json``: full duplex, a streaming request, ``text/event-stream`` response
  headers, ``--sse-chunks`` response chunks (the last carries usage and ``[DONE]``), then
  an empty chunk with end_of_stream (the terminating chunk of a chunked HTTP/1.1 answer).

The request is the reference chat request (``epp.demo.SCENARIO_REQUEST``'s shape, model
``m``); the answers are shaped like vLLM's.  Every stream gets its own ``x-request-id``: a
ghz template (``{{.UUID | b64enc}}``, rendered once per call) in the headers' ``raw_value``.
That costs ghz itself about twice the CPU per stream (measured: 810 against 400 µs on the
JSON sequence, 4,460 against 1,740 µs on SSE), since a templated file is rendered and
parsed again for every call instead of once; ``--fixed-request-id`` writes one constant id
instead (epp only reads the id, for its logs; nothing is keyed on it).
ghz sends every message of a stream without waiting for replies, as FULL_DUPLEX_STREAMED
allows; Envoy's BUFFERED mode is a ping-pong, which ghz does not reproduce.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REQUEST_ID_TEMPLATE = "{{.UUID | b64enc}}"  # ghz: a fresh UUID per call, base64 for raw_value
FIXED_REQUEST_ID = "00000000-0000-4000-8000-000000000000"
MODEL = "m"
CHAT = {
    "model": MODEL,
    "max_completion_tokens": 100,
    "temperature": 0,
    "messages": [{"role": "user", "content": "introduce yourself"}],
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _headers(pairs: Mapping[str, str], *, end_of_stream: bool = False) -> dict[str, Any]:
    headers = [{"key": k, "raw_value": v if v == REQUEST_ID_TEMPLATE else _b64(v.encode())} for k, v in pairs.items()]
    return {"headers": {"headers": headers}, "end_of_stream": end_of_stream}


def _body(data: bytes, end_of_stream: bool) -> dict[str, Any]:
    return {"body": _b64(data), "end_of_stream": end_of_stream}


def _request_headers(body: bytes, request_id: str) -> dict[str, str]:
    return {
        ":authority": "gateway.local",
        ":path": "/v1/chat/completions",
        ":method": "POST",
        ":scheme": "http",
        "content-type": "application/json",
        "content-length": str(len(body)),
        "user-agent": "ghz-bench",
        "x-forwarded-proto": "http",
        "x-request-id": request_id,
    }


def completion() -> bytes:
    return _json({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Hello! I am a benchmark upstream."}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    })  # fmt: skip


def sse_events(chunks: int) -> list[bytes]:
    """``chunks`` writes: chunks - 1 token events, then the last token with usage and ``[DONE]``."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
    token = b"data: " + _json(base | {"choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]})
    usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
    last = b"data: " + _json(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage})
    return [token + b"\n\n"] * (chunks - 1) + [last + b"\n\ndata: [DONE]\n\n"]


def sequence(kind: str, sse_chunks: int, *, fixed_request_id: bool = False) -> list[dict[str, Any]]:
    """The messages of one stream: ``lean-json``, ``buffered-json``, ``duplex-json`` or ``duplex-sse``."""
    request_id = FIXED_REQUEST_ID if fixed_request_id else REQUEST_ID_TEMPLATE
    mode = "BUFFERED" if kind in ("buffered-json", "lean-json", "two-json") else "FULL_DUPLEX_STREAMED"
    response_mode = "NONE" if kind in ("lean-json", "two-json") else mode
    sse = kind == "duplex-sse"
    request = _json(CHAT | {"stream": True, "stream_options": {"include_usage": True}} if sse else CHAT)
    first = {
        "protocol_config": {"request_body_mode": mode, "response_body_mode": response_mode},
        "request_headers": _headers(_request_headers(request, request_id)),
    }
    messages: list[dict[str, Any]] = [first, {"request_body": _body(request, True)}]
    if kind == "two-json":
        return messages
    if sse:
        headers = {":status": "200", "content-type": "text/event-stream", "cache-control": "no-cache"}
        messages.append({"response_headers": _headers(headers)})
        messages += [{"response_body": _body(event, False)} for event in sse_events(sse_chunks)]
        messages.append({"response_body": _body(b"", True)})
    else:
        answer = completion()
        headers = {":status": "200", "content-type": "application/json", "content-length": str(len(answer))}
        messages.append({"response_headers": _headers(headers)})
        if kind != "lean-json":
            messages.append({"response_body": _body(answer, True)})
    return messages


KINDS = ("two-json", "lean-json", "buffered-json", "duplex-json", "duplex-sse")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the ghz data files (one JSON array per stream kind)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sse-chunks", type=int, default=64, help="response chunks of the SSE answer (64)")
    parser.add_argument("--fixed-request-id", action="store_true", help="one constant x-request-id, no ghz template")
    args = parser.parse_args(argv)
    if args.sse_chunks < 1:
        parser.error("--sse-chunks must be at least 1")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        path = args.out_dir / f"{kind}.json"
        path.write_text(json.dumps(sequence(kind, args.sse_chunks, fixed_request_id=args.fixed_request_id)))
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
