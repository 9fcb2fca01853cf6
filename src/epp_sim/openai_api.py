"""OpenAI-compatible request parsing and response shapes, as vLLM writes them.

Owns the pure (I/O-free) half of the HTTP layer: turning a `/v1/completions` or
`/v1/chat/completions` body into a `ParsedRequest`, the chat prompt template, and the JSON
objects of responses, stream chunks, usage and errors. `server.py` does the I/O.

Invariant: every client error is raised as `ApiError`, whose `body()` is vLLM's
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ApiError",
    "ParsedRequest",
    "chat_chunk",
    "completion_chunk",
    "parse_chat",
    "parse_completion",
    "render_chat",
    "usage",
]

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}

Prompt = str | list[int]


class ApiError(Exception):
    """A client-visible error with an HTTP status, in vLLM's JSON shape."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status, "BadRequestError")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """The fields of an OpenAI request that the simulator acts on."""

    chat: bool
    model: str | None
    prompts: tuple[Prompt, ...]
    max_tokens: int | None
    stream: bool
    include_usage: bool
    cache_salt: str | None


def _max_tokens(body: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ApiError(400, f"{key} must be at least 1, got {value!r}.", key)
        return value
    return None


def _common(body: Any) -> tuple[str | None, bool, bool, str | None]:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string.", "model")
    stream = bool(body.get("stream", False))
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object.", "stream_options")
    if options and not stream:
        raise ApiError(400, "Stream options can only be defined when `stream=True`.", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ApiError(400, "Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    return model, stream, include_usage, salt


def parse_completion(body: Any) -> ParsedRequest:
    """Parse a `/v1/completions` body; `max_tokens` defaults to 16 as in vLLM."""
    model, stream, include_usage, salt = _common(body)
    raw = body.get("prompt")
    prompts: list[Prompt]
    if isinstance(raw, str):
        prompts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        prompts = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        prompts = [list(raw)]
    elif isinstance(raw, list) and raw and all(isinstance(x, list) and x for x in raw):
        prompts = [list(x) for x in raw]
    else:
        raise ApiError(400, "prompt must be a string, a list of strings or a list of token ids.", "prompt")
    if any(p == "" for p in prompts):
        raise ApiError(400, "Prompt cannot be empty.", "prompt")
    max_tokens = _max_tokens(body, "max_tokens")
    return ParsedRequest(False, model, tuple(prompts), max_tokens or 16, stream, include_usage, salt)


def parse_chat(body: Any) -> ParsedRequest:
    """Parse a `/v1/chat/completions` body (`max_completion_tokens` wins over `max_tokens`)."""
    model, stream, include_usage, salt = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list.", "messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message must be an object with a role.", "messages")
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    return ParsedRequest(True, model, (render_chat(messages),), max_tokens, stream, include_usage, salt)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


GENERATION_PROMPT = "<|assistant|>\n"  # what the chat template ends with: the assistant's turn begins


def render_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """A fixed chat template; earlier turns render identically, so they share cache blocks."""
    parts = [f"<|{m['role']}|>\n{_content_text(m.get('content'))}\n" for m in messages]
    parts.append(GENERATION_PROMPT)
    return "".join(parts)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """The `usage` object, with `prompt_tokens_details.cached_tokens` always filled."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_chunk(
    rid: str, created: int, model: str, *, index: int, text: str, finish: str | None
) -> dict[str, Any]:
    """One `text_completion` stream chunk."""
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_chunk(
    rid: str, created: int, model: str, *, index: int, delta: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    """One `chat.completion.chunk`."""
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def now_created() -> int:
    """The `created` timestamp of a response."""
    return int(time.time())
