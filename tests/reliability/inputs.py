"""The bad-input matrix: one table of hostile or odd client requests and what epp must answer.

Every row is one HTTP request as a client sends it to the gateway.  ``status`` is what the
client must get back; ``json_error`` says the answer is an error document
``{"error": {"code": status, "message": ...}}`` (epp's ImmediateResponse, or Envoy's own
rendered 403 route for admin paths, which says the same thing).  A row with a 2xx status
must reach exactly one pool pod (the upstream stand-in answers 200), a row with an error
status must reach none.

What epp checks is only what it routes on: the body is a JSON object with a non-empty
string ``model`` on the allowlist and a usable prompt (``prompt`` / ``messages``), the body
fits ``--max-body-bytes``, and the path is not a model server's admin path.  Everything
else (``stream``'s type, ``stream_options``, ``max_tokens``, a message's role) is the model
server's to validate, so those rows are routed.  Where a row expects what epp does not do
today, its ``why`` says so; the tests then fail on that row (see the README's findings).

Used by ``test_bad_input_envoy.py`` (through real Envoy, both body modes) and
``test_bad_input_grpc.py`` (the same rows straight at epp's gRPC port).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson

MAX_BODY = 2 << 20  # the tests' --max-body-bytes: above the 1 MB model name, below the oversized rows
ROGUE = "{rogue}"  # replaced by the address of an HTTP server outside the pool
MAX_ERROR_BODY = 2048  # an error document never grows with the input (messages are clipped to ~512 chars)
MAX_HEADER_VALUE = 1024  # no response header echoes a huge client value


@dataclass(frozen=True, slots=True)
class BadInput:
    id: str
    kind: str
    body: bytes | None  # None: a body-less request (the headers end it)
    status: int
    why: str
    json_error: bool = True  # the answer is {"error": {"code": status, "message": ...}}
    method: str = "POST"
    path: str = "/v1/completions"
    headers: Mapping[str, str] = field(default_factory=dict)  # content-type is application/json unless set
    chunked: bool = False  # no content-length: the body arrives in chunks of unknown total
    upstream_keeps: bytes = b""  # routed rows: bytes the pod must receive unchanged
    upstream_lacks: bytes = b""  # routed rows: bytes the pod must never see
    grpc: bool = True  # meaningful straight at epp's gRPC port (False: a property of Envoy's config)

    @property
    def routed(self) -> bool:
        return self.status < 300

    @property
    def content_type(self) -> str:
        return next((v for k, v in self.headers.items() if k.lower() == "content-type"), "application/json")


def _doc(**fields: object) -> bytes:
    return orjson.dumps(fields)


def _ok(**extra: object) -> bytes:
    return _doc(model="m", prompt="Say hello", max_tokens=3, **extra)


def _chat(messages: object) -> bytes:
    return _doc(model="m", messages=messages, max_tokens=3)


def _nested(depth: int) -> bytes:
    return b'{"model": "m", "prompt": "x", "extra": ' + b"[" * depth + b"]" * depth + b"}"


CHAT = "/v1/chat/completions"
BIG = "a" * (1 << 20)
HUGE_ID = "r" * 8000  # the stand-in pods (aiohttp) refuse header lines over 8190 bytes
BIG_INT = b"123456789012345678901234567890"  # beyond 64 bits: valid JSON, exact digits matter (a seed)
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def _row(id: str, kind: str, body: bytes | None, status: int, why: str, **kw: object) -> BadInput:
    if status < 300:
        kw.setdefault("json_error", False)
    return BadInput(id, kind, body, status, why, **kw)  # type: ignore[arg-type]


INPUTS: tuple[BadInput, ...] = (
    # ---- malformed JSON ------------------------------------------------------------------
    _row("truncated", "malformed-json", b'{"model": "m", "prompt": "hel', 400, "not JSON"),
    _row("trailing-garbage", "malformed-json", _ok() + b" x", 400, "not JSON"),
    _row("not-object-array", "malformed-json", b'[{"model": "m", "prompt": "x"}]', 400, "not an object"),
    _row("not-object-string", "malformed-json", b'"m"', 400, "not an object"),
    _row("not-object-null", "malformed-json", b"null", 400, "not an object"),
    _row("empty-object", "malformed-json", b"{}", 400, "no model"),
    _row("whitespace-only", "malformed-json", b" \n\t ", 400, "not JSON"),
    _row("invalid-utf8", "malformed-json", b'{"model": "m", "prompt": "\xff\xfe"}', 400, "JSON is UTF-8"),
    _row("lone-surrogate", "malformed-json", b'{"model": "m", "prompt": "\\ud800"}', 400,
         "a lone surrogate cannot be re-encoded for the pod"),
    _row("utf8-bom", "malformed-json", b"\xef\xbb\xbf" + _ok(), 400, "RFC 8259 lets a parser refuse a BOM"),
    _row("deep-nesting-2000", "malformed-json", _nested(2000), 400, "past the parser's depth limit"),
    _row("deep-nesting-600", "malformed-json", _nested(600), 200,
         "parses; epp rewrites only the model's value in the client's bytes, so a body nested deeper "
         "than any serialiser writes (orjson: 255) still reaches the pod as sent"),
    _row("duplicate-model-last-allowed", "malformed-json", b'{"model": "nope", "model": "m", "prompt": "x"}', 200,
         "last key wins, as in the pod's parser; every top-level model is rewritten, so first-wins "
         "parsers agree", upstream_lacks=b"nope"),
    _row("duplicate-model-last-unknown", "malformed-json", b'{"model": "m", "model": "nope", "prompt": "x"}', 404,
         "last key wins: the allowlist sees what the pod would see"),
    # ---- numbers -------------------------------------------------------------------------
    _row("nan", "numbers", b'{"model": "m", "prompt": "x", "max_tokens": NaN}', 400, "NaN is not JSON"),
    _row("infinity", "numbers", b'{"model": "m", "prompt": "x", "temperature": Infinity}', 400, "not JSON"),
    _row("float-overflow", "numbers", b'{"model": "m", "prompt": "x", "temperature": 1e400}', 400,
         "no double holds it"),
    _row("big-int-kept", "numbers", b'{"model": "m", "prompt": "x", "seed": ' + BIG_INT + b"}", 200,
         "valid JSON routed on: the pod must get the client's number, not a rounded float "
         "(today: orjson reads it as a float and the rewrite writes 1.2345678901234568e+29)",
         upstream_keeps=BIG_INT),
    _row("max-tokens-negative", "numbers", _doc(model="m", prompt="x", max_tokens=-1), 200,
         "the pod validates max_tokens"),
    # ---- wrong types ---------------------------------------------------------------------
    _row("model-number", "types", _doc(model=5, prompt="x"), 400, "model must be a string"),
    _row("model-list", "types", _doc(model=["m"], prompt="x"), 400, "model must be a string"),
    _row("model-null", "types", _doc(model=None, prompt="x"), 400, "model must be a string"),
    _row("model-object", "types", _doc(model={"name": "m"}, prompt="x"), 400, "model must be a string"),
    _row("model-bool", "types", _doc(model=True, prompt="x"), 400, "model must be a string"),
    _row("prompt-number", "types", _doc(model="m", prompt=5), 400, "prompt must be text or token ids"),
    _row("prompt-object", "types", _doc(model="m", prompt={"text": "x"}), 400, "prompt must be text or token ids"),
    _row("prompt-bool", "types", _doc(model="m", prompt=True), 400, "prompt must be text or token ids"),
    _row("prompt-null", "types", _doc(model="m", prompt=None), 400, "completions need a prompt"),
    _row("prompt-missing", "types", _doc(model="m"), 400, "completions need a prompt"),
    _row("messages-string", "types", _doc(model="m", messages="hi"), 400, "messages must be a list", path=CHAT),
    _row("messages-object", "types", _doc(model="m", messages={"role": "user"}), 400, "messages must be a list",
         path=CHAT),
    _row("messages-empty", "types", _doc(model="m", messages=[]), 400, "messages must be non-empty", path=CHAT),
    _row("messages-missing", "types", _doc(model="m"), 400, "chat needs messages", path=CHAT),
    _row("messages-on-completions", "types", _doc(model="m", messages=5), 400,
         "a body with messages is a chat body, whatever the path"),
    _row("stream-string", "types", _ok(stream="yes"), 200, "the pod validates stream"),
    _row("max-tokens-string", "types", _doc(model="m", prompt="x", max_tokens="ten"), 200,
         "the pod validates max_tokens"),
    # ---- the model -----------------------------------------------------------------------
    _row("model-missing", "model", _doc(prompt="x"), 400, "model is required"),
    _row("model-empty", "model", _doc(model="", prompt="x"), 400, "model is required"),
    _row("model-unknown", "model", _doc(model="nope", prompt="x"), 404, "not on the allowlist"),
    _row("model-1mb", "model", _doc(model=BIG, prompt="x"), 404,
         "not on the allowlist; the echo in the error body and the log line is clipped"),
    _row("model-nul", "model", _doc(model="m\u0000", prompt="x"), 404, "not the same name"),
    _row("model-padded", "model", _doc(model=" m ", prompt="x"), 404, "not the same name"),
    _row("model-case", "model", _doc(model="M", prompt="x"), 404, "names are case-sensitive"),
    # ---- token-id prompts ----------------------------------------------------------------
    _row("ids", "token-ids", _doc(model="m", prompt=[1, 2, 3]), 200, "one tokenized prompt"),
    _row("ids-batch", "token-ids", _doc(model="m", prompt=[[1, 2], [3]]), 200, "a batch of tokenized prompts"),
    _row("strings-batch", "token-ids", _doc(model="m", prompt=["a", "b"]), 200, "a batch of strings"),
    _row("ids-null", "token-ids", _doc(model="m", prompt=[None]), 400, "null is not a token id"),
    _row("ids-empty", "token-ids", _doc(model="m", prompt=[]), 400, "no prompt at all"),
    _row("ids-mixed", "token-ids", _doc(model="m", prompt=[1, "a"]), 400, "neither ids nor strings"),
    _row("ids-batch-mixed", "token-ids", _doc(model="m", prompt=[[1], "a"]), 400, "neither ids nor strings"),
    _row("ids-batch-empty-inner", "token-ids", _doc(model="m", prompt=[[1], []]), 400, "an empty prompt in a batch"),
    _row("ids-negative", "token-ids", _doc(model="m", prompt=[-1]), 400, "not a token id"),
    _row("ids-float", "token-ids", _doc(model="m", prompt=[1.5]), 400, "not a token id"),
    _row("ids-bool", "token-ids", _doc(model="m", prompt=[True]), 400, "true is not a token id"),
    _row("ids-too-large", "token-ids", _doc(model="m", prompt=[1 << 24]), 400, "beyond any vocabulary"),
    # ---- chat messages -------------------------------------------------------------------
    _row("content-parts", "chat", _chat([{"role": "user", "content": [
        {"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
    ]}]), 200, "content parts: the text parts count", path=CHAT),
    _row("content-null-tool-calls", "chat", _chat([
        {"role": "user", "content": "call f"},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]), 200, "an assistant turn with tool calls and no content", path=CHAT),
    _row("role-number", "chat", _chat([{"role": 5, "content": "hi"}]), 200, "the pod validates roles", path=CHAT),
    _row("message-not-object", "chat", _chat(["hi"]), 200, "the pod validates messages", path=CHAT),
    _row("content-object", "chat", _chat([{"role": "user", "content": {"text": "x"}}]), 200,
         "the pod validates content", path=CHAT),
    _row("content-part-text-number", "chat", _chat([{"role": "user", "content": [{"type": "text", "text": 5}]}]),
         200, "the pod validates parts", path=CHAT),
    # ---- size ----------------------------------------------------------------------------
    _row("just-under-limit", "size", _doc(model="m", prompt="x" * (MAX_BODY - 100)), 200, "fits the limit"),
    _row("over-limit-content-length", "size", _doc(model="m", prompt="x" * (MAX_BODY + 1)), 413,
         "content-length over the limit: refused on the headers"),
    _row("over-limit-chunked", "size", _doc(model="m", prompt="x" * (MAX_BODY + 1)), 413,
         "no content-length: refused once the chunks pass the limit", chunked=True),
    # ---- content type --------------------------------------------------------------------
    _row("text-plain", "content-type", _ok(), 200, "epp routes on the body; the pod decides on content-type",
         headers={"content-type": "text/plain"}),
    _row("no-content-type", "content-type", _ok(), 200, "as above", headers={"content-type": ""}),
    _row("form-urlencoded", "content-type", b"model=m&prompt=x", 400, "not JSON",
         headers={"content-type": "application/x-www-form-urlencoded"}),
    _row("utf16", "content-type", '{"model": "m", "prompt": "x"}'.encode("utf-16"), 400, "JSON is UTF-8",
         headers={"content-type": "application/json; charset=utf-16"}),
    # ---- method and path -----------------------------------------------------------------
    _row("post-empty-body", "method-path", b"", 400,
         "an inference POST with no body has nothing to route on: 400 like any body without a model "
         "(today: routed to a pod as if it were a GET)"),
    _row("get-with-body", "method-path", _doc(model="m"), 200, "a body is routed on whatever the method",
         method="GET", path="/v1/models"),
    _row("get-with-body-unknown-model", "method-path", _doc(model="nope"), 404, "the allowlist still applies",
         method="GET", path="/v1/models"),
    _row("get-with-garbage-body", "method-path", b"garbage", 400, "a body epp must route on is not JSON",
         method="GET", path="/v1/models"),
    _row("get-no-body", "method-path", None, 200, "body-less GETs are routed on the headers",
         method="GET", path="/v1/models"),
    _row("unknown-path", "method-path", _ok(), 200, "epp routes any path; the pod answers unknown ones",
         path="/v2/unknown"),
    _row("delete-no-body", "method-path", None, 200, "body-less: routed on the headers",
         method="DELETE", path="/v1/models/m"),
    # ---- admin paths ---------------------------------------------------------------------
    _row("load-lora", "admin-path", _doc(lora_name="x", lora_path="/tmp/x"), 403, "admin path",
         path="/v1/load_lora_adapter"),
    _row("unload-lora", "admin-path", _doc(lora_name="x"), 403, "admin path", path="/v1/unload_lora_adapter"),
    _row("load-lora-subpath", "admin-path", _doc(lora_name="x"), 403, "admin path", path="/v1/load_lora_adapter/"),
    _row("metrics", "admin-path", None, 403, "admin path", method="GET", path="/metrics"),
    _row("metrics-query", "admin-path", None, 403, "admin path", method="GET", path="/metrics?name[]=x"),
    _row("metrics-with-body", "admin-path", _ok(), 403, "admin path, whatever the body", path="/metrics"),
    _row("reset-prefix-cache", "admin-path", None, 403, "admin path", path="/reset_prefix_cache"),
    _row("sleep", "admin-path", None, 403, "admin path", path="/sleep?level=1"),
    # ---- clients' copies of epp's control headers -----------------------------------------
    _row("destination-header", "control-header", _ok(), 200, "a client cannot choose the pod",
         headers={"x-gateway-destination-endpoint": ROGUE}),
    _row("destination-header-unknown-model", "control-header", _doc(model="nope", prompt="x"), 404,
         "nor route an unknown model by naming a pod", headers={"x-gateway-destination-endpoint": ROGUE}),
    _row("mirror-header", "control-header", _ok(), 200, "a client cannot choose a mirror (Envoy strips it)",
         headers={"x-gateway-mirror-endpoint": ROGUE}, grpc=False),
    _row("rewrite-header", "control-header", _ok(), 200, "a client cannot choose the target model",
         headers={"x-gateway-model-name-rewrite": "evil-model"}, upstream_lacks=b"evil-model"),
    _row("rewrite-header-unknown-model", "control-header", _doc(model="nope", prompt="x"), 404,
         "nor bypass the allowlist", headers={"x-gateway-model-name-rewrite": "m"}),
    # ---- request ids ---------------------------------------------------------------------
    _row("huge-request-id-bad-body", "request-id", b"{not json", 400, "the id is never echoed whole",
         headers={"x-request-id": HUGE_ID}),
    _row("huge-request-id-good", "request-id", _ok(), 200, "routed; log lines clip the id",
         headers={"x-request-id": HUGE_ID}),
    # ---- streaming -----------------------------------------------------------------------
    _row("stream-options-string", "streaming", _ok(stream=True, stream_options="yes"), 200,
         "the pod validates stream_options"),
    _row("stream-options-bad-usage", "streaming", _ok(stream=True, stream_options={"include_usage": "maybe"}), 200,
         "the pod validates stream_options"),
    _row("stream-options-list", "streaming", _ok(stream=True, stream_options=[1]), 200,
         "the pod validates stream_options"),
    _row("stream-truncated", "streaming", b'{"model": "m", "stream": true, "prompt": "x"', 400, "not JSON"),
    _row("stream-unknown-model", "streaming", _doc(model="nope", prompt="x", stream=True), 404, "not on the allowlist"),
    _row("stream-chat-bad-options", "streaming", _doc(model="m", messages=[{"role": "user", "content": "hi"}],
         stream=True, stream_options={"include_usage": 1}), 200, "the pod validates stream_options", path=CHAT),
)


def counts_by_kind(rows: tuple[BadInput, ...] = INPUTS) -> dict[str, int]:
    """How many inputs of each kind the matrix tries (the README's table)."""
    return dict(collections.Counter(r.kind for r in rows))


if __name__ == "__main__":  # print the README's counts: python tests/reliability/inputs.py
    for kind, n in counts_by_kind().items():
        print(f"| {kind} | {n} |")
    print(f"| total | {len(INPUTS)} |")
