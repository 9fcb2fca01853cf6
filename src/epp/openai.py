"""OpenAI-style request and response handling; pure functions, no I/O.

* :func:`parse_inference_request` turns a request body into an :class:`InferenceRequest`
  (raises :class:`BadRequest`).
* :class:`UsageParser` follows a response body (a JSON document or an SSE stream whose
  events may be split across chunks) and extracts token usage.
* :func:`rewrite_model` / :class:`ModelNameRestorer` change the ``model`` field on the
  way in and restore the client-facing name on the way out.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from epp.domain import CHARS_PER_TOKEN, InferenceRequest, estimate_tokens
from epp.errors import BadRequest

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"


def new_request_id() -> str:
    return str(uuid.uuid4())


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}, {"type": "image_url", ...}]
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def _prompt_text(path: str, doc: dict[str, Any]) -> str:
    if path.startswith(CHAT_COMPLETIONS) or "messages" in doc:
        messages = doc.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        return "".join(
            f"{m.get('role', '')}:{_content_text(m.get('content'))}\n" for m in messages if isinstance(m, dict)
        )
    prompt = doc.get("prompt")
    if path.startswith(COMPLETIONS) and prompt is None:
        raise BadRequest("'prompt' is required")
    if prompt is None or isinstance(prompt, str):
        return prompt or ""
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):  # a batch of strings
            return "".join(prompt)
        if all(_is_token_id(t) for t in prompt):  # one tokenized prompt
            return token_text(prompt)
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):  # a batch of them
            return "".join(token_text(p) for p in prompt)
    raise BadRequest("'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists")


_TOKEN_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+/"
_TOKEN_ID_LIMIT = len(_TOKEN_DIGITS) ** CHARS_PER_TOKEN  # 16.7M: larger than any vocabulary


def _is_token_id(value: Any) -> bool:
    return type(value) is int and 0 <= value < _TOKEN_ID_LIMIT


def token_text(ids: list[int]) -> str:
    """Token ids as text for prefix hashing: each id is ``CHARS_PER_TOKEN`` characters.

    So a token-id prompt's estimated token count is exact, and its blocks of ``n`` tokens
    are the text's blocks of ``n x CHARS_PER_TOKEN`` characters: prefix affinity works on
    token ids as it does on text (two prompts sharing leading ids share leading blocks).
    """
    digits = _TOKEN_DIGITS
    out = []
    for t in ids:
        out.append(digits[t >> 18 & 63] + digits[t >> 12 & 63] + digits[t >> 6 & 63] + digits[t & 63])
    return "".join(out)


def parse_inference_request(
    body: bytes,
    headers: Mapping[str, str],
    *,
    path: str = "",
    request_id: str = "",
    subset: tuple[str, ...] | None = None,
) -> tuple[InferenceRequest, dict[str, Any]]:
    """Parse an OpenAI request body; return the request and the decoded JSON document."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string")
    prompt = _prompt_text(path, doc)
    request = InferenceRequest(
        request_id=request_id or new_request_id(),
        model=model,
        target_model=model,
        prompt=prompt,
        prompt_tokens=estimate_tokens(prompt),
        stream=doc.get("stream") is True,
        subset=subset,
        headers=headers,
    )
    return request, doc


def rewrite_model(doc: dict[str, Any], target_model: str) -> bytes:
    """Serialise ``doc`` with ``model`` set to ``target_model``."""
    doc["model"] = target_model
    return orjson.dumps(doc)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def _usage_from(doc: Any) -> Usage | None:
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if not isinstance(usage, dict) and doc.get("type") == "response.completed":
        response = doc.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    details = usage.get("prompt_tokens_details") or usage.get("prompt_token_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return Usage(
        prompt_tokens=prompt if isinstance(prompt, int) else 0,
        completion_tokens=completion if isinstance(completion, int) else 0,
        cached_tokens=cached if isinstance(cached, int) else 0,
    )


class UsageParser:
    """Feed response chunks; read ``usage`` once the body is complete.

    SSE mode splits the byte stream into events on blank lines, so an event split
    across chunks is parsed once whole.  JSON mode buffers up to ``max_bytes`` and
    parses at the end; a larger body yields no usage rather than unbounded memory.
    """

    def __init__(self, *, sse: bool, max_bytes: int = 8 * 1024 * 1024) -> None:
        self.sse = sse
        self.usage: Usage | None = None
        self._buf = bytearray()
        self._max = max_bytes
        self._overflow = False
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        if not chunk or self._overflow:
            return
        self._buf += chunk
        if self.sse:
            self._drain_events()
        elif len(self._buf) > self._max:
            self._overflow = True
            self._buf.clear()

    def finish(self) -> Usage | None:
        if self.sse:
            if self._buf.strip():
                self._buf += b"\n\n"
                self._drain_events()
        elif self._buf and not self._overflow:
            with contextlib.suppress(orjson.JSONDecodeError):
                self.usage = _usage_from(orjson.loads(self._buf)) or self.usage
        self._buf.clear()
        return self.usage

    def _drain_events(self) -> None:
        buf = self._buf
        start = 0
        while True:
            end, sep = _find_event_end(buf, start)
            if end < 0:
                break
            self._event(bytes(buf[start:end]))
            start = end + sep
        if start:
            del buf[:start]
        if len(buf) > self._max:  # one unterminated event larger than the cap: give up on it
            buf.clear()

    def _event(self, event: bytes) -> None:
        self.events += 1
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if not data or data == b"[DONE]":
                continue
            try:
                usage = _usage_from(orjson.loads(data))
            except orjson.JSONDecodeError:
                continue
            if usage is not None:
                self.usage = usage


def _find_event_end(buf: bytearray, start: int) -> tuple[int, int]:
    """Index of the blank line ending the next SSE event and the separator's length."""
    best, size = -1, 0
    for sep in (b"\n\n", b"\r\n\r\n"):
        i = buf.find(sep, start)
        if i >= 0 and (best < 0 or i < best):
            best, size = i, len(sep)
    return best, size


class ModelNameRestorer:
    """Replace ``"model":"<target>"`` with the client-facing name in response chunks.

    Keeps a small tail between chunks so a match split across chunk boundaries is
    still replaced; output bytes are delayed by at most that tail.
    """

    def __init__(self, target: str, client: str) -> None:
        t, c = orjson.dumps(target), orjson.dumps(client)
        self._pairs = [(b'"model":' + t, b'"model":' + c), (b'"model": ' + t, b'"model": ' + c)]
        self._keep = max(len(p[0]) for p in self._pairs) - 1
        self._tail = b""

    def feed(self, chunk: bytes, end: bool) -> bytes:
        data = self._tail + chunk
        for old, new in self._pairs:
            data = data.replace(old, new)
        if end:
            self._tail = b""
            return data
        start = max(0, len(data) - self._keep)
        while (i := data.find(b'"', start)) >= 0:
            rest = data[i:]
            if any(old.startswith(rest) for old, _ in self._pairs):
                self._tail = bytes(rest)
                return data[:i]
            start = i + 1
        self._tail = b""
        return data
