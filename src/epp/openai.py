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
import re
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


def _chat_messages(path: str, doc: dict[str, Any]) -> tuple[tuple[str, str], ...] | None:
    """(role, text) per message of a chat request; None for other requests."""
    if not (path.startswith(CHAT_COMPLETIONS) or "messages" in doc):
        return None
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    return tuple((str(m.get("role", "")), _content_text(m.get("content"))) for m in messages if isinstance(m, dict))


# what shapes a chat's rendered prompt on the server (vLLM's chat and tokenize requests share these)
_CHAT_RENDERING = (
    "messages", "tools", "documents", "chat_template", "chat_template_kwargs", "add_generation_prompt",
    "continue_final_message", "add_special_tokens",
)  # fmt: skip


def _prompt_source(doc: dict[str, Any], chat: bool) -> dict[str, Any] | None:
    """``InferenceRequest.prompt_source``: references into the parsed document, nothing copied."""
    if chat:
        return {k: doc[k] for k in _CHAT_RENDERING if k in doc}
    prompt = doc.get("prompt")
    if isinstance(prompt, str):
        special = doc.get("add_special_tokens")
        return {"prompt": prompt} if special is None else {"prompt": prompt, "add_special_tokens": special}
    if isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        return {"token_ids": prompt}
    return None  # a batch: each prompt is its own request on the server


def _prompt_text(path: str, doc: dict[str, Any], messages: tuple[tuple[str, str], ...] | None = None) -> str:
    if messages is not None:
        return "".join(f"{role}:{text}\n" for role, text in messages)
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
    objective: str = "",
    model_rewrite: str = "",
    prompt_source: bool = False,
) -> tuple[InferenceRequest, dict[str, Any]]:
    """Parse an OpenAI request body; return the request and the decoded JSON document.

    ``objective`` and ``model_rewrite`` are what the transport read from its headers (the
    InferenceObjective name, the gateway's model-rewrite header), passed through.
    ``prompt_source``: also fill ``InferenceRequest.prompt_source`` (only a server tokenizer
    reads it, so the transport asks for it only then).
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string")
    messages = _chat_messages(path, doc)
    prompt = _prompt_text(path, doc, messages)
    request = InferenceRequest(
        request_id=request_id or new_request_id(),
        model=model,
        target_model=model,
        prompt=prompt,
        prompt_tokens=estimate_tokens(prompt),
        stream=doc.get("stream") is True,
        subset=subset,
        objective=objective,
        model_rewrite=model_rewrite,
        headers=headers,
        messages=messages or (),
        prompt_source=_prompt_source(doc, messages is not None) if prompt_source else None,
    )
    return request, doc


def _string_end(body: bytes, quote: int) -> int:
    """Index of the quote closing the JSON string that opens at ``quote`` (-1 if unterminated)."""
    end = body.find(b'"', quote + 1)
    while end > 0 and body[end - 1] == 0x5C:  # a backslash before it: escaped unless the run is even
        run = end - 1
        while body[run - 1] == 0x5C:
            run -= 1
        if (end - run) % 2 == 0:
            break
        end = body.find(b'"', end + 1)
    return end


def _top_level_string_spans(body: bytes, key: str) -> list[tuple[int, int]]:
    """Where each top-level member ``key`` has a string value (a duplicated key appears twice).

    Strings are skipped with ``bytes.find`` (the body is mostly prompt text), so only the
    few bytes between strings are looked at one by one.
    """
    depth, expect_key, current, i = 0, False, None, 0
    found: list[tuple[int, int]] = []
    while True:
        quote = body.find(b'"', i)
        for byte in body[i : quote if quote >= 0 else len(body)]:
            if byte in b"{[":
                depth += 1
                expect_key = depth == 1 and byte == 0x7B
                if depth == 2:
                    current = None  # an object or array value: not a string
            elif byte in b"}]":
                depth -= 1
            elif byte == 0x2C and depth == 1:  # ","
                expect_key, current = True, None
        if quote < 0:
            return found
        end = _string_end(body, quote)
        if end < 0:
            return found
        if depth == 1 and expect_key:
            raw = body[quote + 1 : end]
            current = orjson.loads(body[quote : end + 1]) if b"\\" in raw else raw.decode("utf-8", "replace")
            expect_key = False
        elif depth == 1 and current is not None:
            if current == key:
                found.append((quote, end + 1))
            current = None
        i = end + 1


def rewrite_model(body: bytes, doc: dict[str, Any], target_model: str) -> bytes:
    """``body`` with its ``model`` set to ``target_model``.

    Only the model's value is replaced: every other byte is the client's, so numbers beyond
    64 bits, key order, spacing and nesting deeper than any serialiser allows reach the pod
    as sent (and the rest of the body is not serialised again).  A duplicated ``model`` key
    is rewritten everywhere, so parsers that keep the first and ones that keep the last agree.
    """
    spans = _top_level_string_spans(body, "model")
    if spans:
        value = orjson.dumps(target_model)
        parts: list[bytes] = []
        at = 0
        for start, end in spans:
            parts += (body[at:start], value)
            at = end
        parts.append(body[at:])
        return b"".join(parts)
    try:  # not found by the scanner (never for a document orjson parsed): serialise the document
        return orjson.dumps({**doc, "model": target_model})
    except TypeError:
        raise BadRequest("request body cannot be rewritten (nested too deeply)") from None


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

    Servers write ``usage`` last (OpenAI's ``include_usage`` chunk before ``[DONE]``; with
    vLLM's continuous usage every chunk carries the running total, so the last is the
    total), so nothing is parsed while the body streams: a chunk costs one append.
    ``finish`` reads the usage out of the end of the body.  In SSE mode that is the last
    ``data:`` line holding a ``"usage": {...}`` object that parses, found by searching
    backwards (an event split across chunks is whole by then, so under ``max_bytes`` any
    chunking gives the same answer).  In JSON mode the whole body is parsed when it stayed
    under ``max_bytes``.  Past ``max_bytes`` either mode keeps only the body's last 64 KiB
    and reads the usage out of that tail, so memory stays bounded whatever the response's
    size.
    """

    def __init__(self, *, sse: bool, max_bytes: int = 256 * 1024) -> None:
        self.sse = sse
        self.usage: Usage | None = None
        self._buf = bytearray()
        self._max = max_bytes
        self._tail = min(_TAIL_BYTES, max_bytes)
        self._overflow = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        buf = self._buf
        buf += chunk
        if len(buf) > self._max:
            self._overflow = True  # from now on only the tail is kept
            del buf[: len(buf) - self._tail]

    def finish(self) -> Usage | None:
        buf = bytes(self._buf)
        self._buf.clear()
        if not buf:
            return self.usage
        if self.sse:
            usage = _last_sse_usage(_after_first_line(buf) if self._overflow else buf)
            if usage is None and self._overflow:
                # the kept tail starts inside a line, which may be the one with the usage (a
                # Responses API "response.completed" event carries the whole output text)
                usage = _usage_in_tail(buf)
            self.usage = usage or self.usage
        elif not self._overflow:
            with contextlib.suppress(orjson.JSONDecodeError):
                self.usage = _usage_from(orjson.loads(buf)) or self.usage
        else:
            self.usage = _usage_in_tail(buf) or self.usage
        return self.usage


def _after_first_line(tail: bytes) -> bytes:
    """A kept tail without its first line, which the cut may have started inside."""
    ends = [i for i in (tail.find(b"\n"), tail.find(b"\r")) if i >= 0]
    return tail[min(ends) + 1 :] if ends else b""


def _last_sse_usage(body: bytes) -> Usage | None:
    """The usage of the last ``data:`` line (SSE) whose JSON parses and holds a usage object.

    Linear in the body: a ``"usage"`` not followed by ``:`` and ``{`` costs one comparison, and
    each line is looked at once (line ends are searched for within the line only)."""
    at = len(body)
    while (at := body.rfind(b'"usage"', 0, at)) >= 0:
        if not _usage_object_at(body, at):
            continue
        newline = body.rfind(b"\n", 0, at)
        line_start = max(newline, body.rfind(b"\r", newline + 1, at)) + 1
        if body.startswith(b"data:", line_start):
            stop = body.find(b"\n", at)
            stop = len(body) if stop < 0 else stop
            cr = body.find(b"\r", at, stop)
            try:
                usage = _usage_from(orjson.loads(body[line_start + 5 : stop if cr < 0 else cr]))
            except orjson.JSONDecodeError:
                usage = None
            if usage is not None:
                return usage
        at = line_start  # the rest of this line is done with: look at earlier lines
    return None


_TAIL_BYTES = 64 * 1024


def _usage_in_tail(tail: bytes) -> Usage | None:
    """The last ``"usage": {...}`` object in the end of a JSON body too large to keep whole."""
    at = tail.rfind(b'"usage"')
    while at >= 0:
        start = tail.find(b"{", at + 7)
        if start > 0 and tail[at + 7 : start].strip() == b":":
            depth = 0
            for i in range(start, len(tail)):
                byte = tail[i]
                if byte == 0x7B:
                    depth += 1
                elif byte == 0x7D:
                    depth -= 1
                    if depth == 0:
                        with contextlib.suppress(orjson.JSONDecodeError):
                            return _usage_from({"usage": orjson.loads(tail[start : i + 1])})
                        break
        at = tail.rfind(b'"usage"', 0, at)
    return None


def _usage_object_at(body: bytes, at: int) -> bool:
    """Whether the ``"usage"`` at ``at`` is a key whose value is an object (not ``null``: vLLM
    sends ``"usage": null`` on every token when ``include_usage`` is on)."""
    rest = body[at + 7 : at + 32].lstrip()
    return rest[:1] == b":" and rest[1:].lstrip()[:1] == b"{"


class ModelNameRestorer:
    """Replace ``"model":"<target>"`` with the client-facing name in response chunks.

    Keeps a small tail between chunks so a match split across chunk boundaries is
    still replaced; output bytes are delayed by at most that tail.  Only bytes not yet
    replaced are searched, so a restored name is never matched again.
    """

    def __init__(self, target: str, client: str) -> None:
        t, c = orjson.dumps(target), orjson.dumps(client)
        self._pattern = re.compile(b'"model":( ?)' + re.escape(t))
        self._client = c
        self._olds = (b'"model":' + t, b'"model": ' + t)
        self._keep = len(self._olds[1]) - 1
        self._tail = b""

    def pending(self) -> bytes:
        """The held-back tail, handed out (for a response that ends without a final body chunk)."""
        tail, self._tail = self._tail, b""
        return tail

    def feed(self, chunk: bytes, end: bool) -> bytes:
        data = self._tail + chunk if self._tail else chunk
        out: list[bytes] = []
        at = 0
        if b'"model"' in data:
            for match in self._pattern.finditer(data):
                out += (data[at : match.start()], b'"model":', match.group(1), self._client)
                at = match.end()
        rest = data[at:] if at else data
        self._tail = b""
        if not end:
            start = max(0, len(rest) - self._keep)
            while (i := rest.find(b'"', start)) >= 0:
                if any(old.startswith(rest[i:]) for old in self._olds):
                    self._tail = bytes(rest[i:])
                    rest = rest[:i]
                    break
                start = i + 1
        if not out:
            return rest
        out.append(rest)
        return b"".join(out)
