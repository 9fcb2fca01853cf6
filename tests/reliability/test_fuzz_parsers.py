"""Property-based fuzzing of the OpenAI parsers (``epp/openai.py``) with hypothesis.

Request side: :func:`parse_inference_request` on arbitrary bytes, arbitrary JSON documents
and OpenAI-shaped requests whose fields have random types; nothing but a ``Rejected``
may escape, and what it returns is well-formed.  Response side: :class:`UsageParser`
(JSON and SSE) and :class:`ModelNameRestorer` on bodies cut at arbitrary chunk
boundaries; any chunking must give what the whole body gives, nothing raises, and
neither keeps more than its limit between chunks.

The profile is fixed for CI: derandomized (the same examples on every run), no
example database, no deadline (the machine is shared).
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import orjson
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from epp.domain import CHARS_PER_TOKEN, estimate_tokens
from epp.errors import Rejected
from epp.openai import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    ModelNameRestorer,
    Usage,
    UsageParser,
    parse_inference_request,
    rewrite_model,
)

from support.fuzz import ci

CI = ci(max_examples=100)

PATHS = st.sampled_from([COMPLETIONS, CHAT_COMPLETIONS, "", "/v1/responses", "/v1/completions?x=1", "/other"])

# ---- strategies ----------------------------------------------------------------------------

# JSON scalars orjson can write (ints within 64 bits, finite floats) and any JSON text
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)


def token_ids() -> st.SearchStrategy[Any]:
    """Valid token ids, and the values a careless client sends instead."""
    return st.integers(min_value=0, max_value=2**24 - 1) | st.integers(min_value=-5, max_value=2**40) | st.booleans()


PROMPTS = (
    st.text(max_size=50)
    | st.lists(st.text(max_size=10), max_size=4)
    | st.lists(token_ids(), max_size=8)
    | st.lists(st.lists(token_ids(), max_size=4), max_size=3)
    | JSON_VALUES
)
CONTENT_PARTS = st.fixed_dictionaries(
    {},
    optional={"type": st.sampled_from(["text", "image_url"]) | JSON_VALUES, "text": st.text(max_size=10) | JSON_VALUES},
)
CONTENTS = st.text(max_size=30) | st.lists(CONTENT_PARTS | JSON_VALUES, max_size=4) | JSON_VALUES
MESSAGES = (
    st.lists(
        st.fixed_dictionaries(
            {}, optional={"role": st.sampled_from(["system", "user", "assistant"]) | JSON_VALUES, "content": CONTENTS}
        )
        | JSON_VALUES,
        max_size=4,
    )
    | JSON_VALUES
)
OPENAI_REQUESTS = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=12) | JSON_VALUES,
        "prompt": PROMPTS,
        "messages": MESSAGES,
        "stream": st.booleans() | JSON_VALUES,
        "max_tokens": JSON_VALUES,
        "stream_options": JSON_VALUES,
    },
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given offsets (clamped, sorted, duplicates give empty chunks)."""
    points = sorted(min(max(c, 0), len(data)) for c in cuts)
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def split(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> tuple[bytes, list[bytes]]:
    """A body and the same body cut into chunks at random offsets (empty chunks included)."""
    body = draw(bodies)
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=12))
    return body, chunked(body, cuts)


# model names, with the characters JSON escapes
NAMES = st.sampled_from(["m-target", "m", 'q"uote', "back\\slash", "ünï", "model", 'x"model']) | st.text(max_size=8)

# ---- the request parser ---------------------------------------------------------------------


def check_parsed(body: bytes, path: str) -> bool:
    """Parse; a non-``Rejected`` exception fails the test.  True when the body was accepted."""
    try:
        request, doc = parse_inference_request(body, {"x": "y"}, path=path, request_id="r1", subset=("a",))
    except Rejected as rejected:
        assert 400 <= rejected.http_status < 600
        return False
    assert isinstance(doc, dict)
    assert isinstance(request.model, str) and request.model and request.model == doc["model"]
    assert request.target_model == request.model and request.request_id == "r1" and request.subset == ("a",)
    assert isinstance(request.prompt, str)
    assert type(request.prompt_tokens) is int and request.prompt_tokens >= 0
    assert request.prompt_tokens == estimate_tokens(request.prompt)
    assert request.stream is (doc.get("stream") is True)
    return True


@CI
@given(body=st.binary(max_size=300), path=PATHS)
def test_request_parser_on_arbitrary_bytes_only_rejects(body: bytes, path: str) -> None:
    check_parsed(body, path)


@CI
@given(
    body=st.sampled_from([b"", b"{", b"[]", b"null", b'{"model":', b"\xff\xfe", b'{"model":"m"}', b"[" * 2000])
    | st.binary(max_size=40).map(lambda b: b'{"model":"m","prompt":"' + b + b'"}'),
    path=PATHS,
)
def test_request_parser_on_broken_json_only_rejects(body: bytes, path: str) -> None:
    check_parsed(body, path)


@CI
@given(doc=JSON_VALUES, path=PATHS)
def test_request_parser_on_arbitrary_json_documents(doc: Any, path: str) -> None:
    accepted = check_parsed(orjson.dumps(doc), path)
    if accepted:
        assert isinstance(doc, dict) and isinstance(doc.get("model"), str)


@CI
@given(doc=OPENAI_REQUESTS, path=PATHS)
def test_request_parser_on_openai_shaped_requests_with_random_field_types(doc: dict[str, Any], path: str) -> None:
    accepted = check_parsed(orjson.dumps(doc), path)
    model = doc.get("model")
    chat = path.startswith(CHAT_COMPLETIONS) or "messages" in doc
    # the cases that must be accepted (an oracle independent of the implementation)
    if isinstance(model, str) and model:
        if chat and isinstance(doc.get("messages"), list) and doc["messages"]:
            assert accepted
        if not chat and isinstance(doc.get("prompt"), str):
            assert accepted
        if not chat and "prompt" not in doc and not path.startswith(COMPLETIONS):
            assert accepted
    else:
        assert not accepted


@CI
@given(ids=st.lists(st.integers(min_value=0, max_value=2**24 - 1), min_size=1, max_size=50))
def test_token_id_prompt_estimate_is_exact(ids: list[int]) -> None:
    request, _ = parse_inference_request(orjson.dumps({"model": "m", "prompt": ids}), {}, path=COMPLETIONS)
    assert request.prompt_tokens == len(ids) and len(request.prompt) == len(ids) * CHARS_PER_TOKEN


# ---- the request body's model rewrite ----------------------------------------------------------

WS = st.sampled_from(["", " ", "\n", "\t", " \r\n "])
MODEL_KEYS = st.sampled_from(['"model"', '"mod\\u0065l"', '"\\u006dodel"', '"model"'])  # the same key, spelled 3 ways
STRING_VALUES = st.text(max_size=10).map(lambda t: json.dumps(t, ensure_ascii=False)) | st.text(max_size=10).map(
    json.dumps
)


Segment = tuple[str, bool]  # JSON text, and whether it is a top-level ``model`` member's string value


@st.composite
def json_texts(draw: st.DrawFn) -> list[Segment]:
    """A JSON object as a client may write it: any spacing and escapes, nested and repeated ``model`` keys."""

    def value() -> str:
        return draw(
            STRING_VALUES
            | JSON_VALUES.map(lambda v: json.dumps(v, indent=draw(st.none() | st.integers(0, 2))))
            | st.integers(min_value=2**64, max_value=2**80).map(str)  # beyond 64 bits: only the client's text keeps it
        )

    segments: list[Segment] = [("{", False)]
    for n in range(draw(st.integers(min_value=1, max_value=6))):
        if draw(st.booleans()):
            key, val = draw(MODEL_KEYS), draw(STRING_VALUES) if draw(st.integers(0, 9)) else value()
        else:
            key = draw(st.text(max_size=6).map(json.dumps))
            val = value() if draw(st.booleans()) else "{" + draw(MODEL_KEYS) + ":" + draw(STRING_VALUES) + "}"
        is_model = json.loads(key) == "model" and val.startswith('"')
        segments.append(("," * (n > 0) + draw(WS) + key + draw(WS) + ":" + draw(WS), False))
        segments += [(val, is_model), (draw(WS), False)]
    segments.append(("}", False))
    return segments


@settings(CI, max_examples=300)
@given(segments=json_texts(), target=NAMES)
def test_model_rewrite_changes_only_the_top_level_models_values(segments: list[Segment], target: str) -> None:
    body = "".join(text for text, _ in segments).encode()
    doc = orjson.loads(body)
    event(f"top-level model is a {type(doc.get('model')).__name__}")
    if not isinstance(doc.get("model"), str):
        return
    out = rewrite_model(body, dict(doc), target)
    assert orjson.loads(out) == {**doc, "model": target}
    # every other byte is the client's (key order, spacing, escapes, numbers beyond 64 bits); every
    # top-level model string is the target, so parsers keeping the first or the last duplicate agree
    pattern = b"".join(rb'("(?:[^"\\]|\\.)*")' if is_model else re.escape(text.encode()) for text, is_model in segments)
    match = re.fullmatch(pattern, out, re.DOTALL)
    assert match is not None, out
    assert all(json.loads(value) == target for value in match.groups())


# ---- UsageParser ---------------------------------------------------------------------------


def feed_all(parser: UsageParser, chunks: list[bytes]) -> Usage | None:
    for chunk in chunks:
        parser.feed(chunk)
        assert len(parser._buf) <= parser._max  # the documented bound, after every chunk
    usage = parser.finish()
    assert len(parser._buf) == 0
    if usage is not None:
        for count in (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens):
            assert isinstance(count, int)
    return usage


def as_tuple(usage: Usage | None) -> tuple[int, int, int] | None:
    return None if usage is None else (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)


USAGE_DOCS = st.fixed_dictionaries(
    {},
    optional={
        "prompt_tokens": st.integers(0, 10**6) | JSON_VALUES,
        "completion_tokens": st.integers(0, 10**6) | JSON_VALUES,
        "input_tokens": st.integers(0, 10**6),
        "output_tokens": st.integers(0, 10**6),
        "prompt_tokens_details": st.fixed_dictionaries({}, optional={"cached_tokens": st.integers(0, 99) | JSON_VALUES})
        | JSON_VALUES,
    },
)
RESPONSE_DOCS = st.fixed_dictionaries(
    {"id": st.text(max_size=5)},
    optional={
        "usage": USAGE_DOCS | JSON_VALUES,
        "type": st.just("response.completed") | st.text(max_size=5),
        "response": st.fixed_dictionaries({}, optional={"usage": USAGE_DOCS}) | JSON_VALUES,
        "choices": JSON_VALUES,
    },
)


@CI
@given(case=split(st.binary(max_size=400) | RESPONSE_DOCS.map(orjson.dumps)), sse=st.booleans())
def test_usage_parser_never_raises_and_any_chunking_gives_the_whole_bodys_usage(
    case: tuple[bytes, list[bytes]], sse: bool
) -> None:
    body, chunks = case
    whole = feed_all(UsageParser(sse=sse), [body])
    assert as_tuple(feed_all(UsageParser(sse=sse), chunks)) == as_tuple(whole)


@CI
@given(doc=RESPONSE_DOCS, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_json_usage_is_read_from_the_document(doc: dict[str, Any], cuts: list[int]) -> None:
    usage = feed_all(UsageParser(sse=False), chunked(orjson.dumps(doc), cuts))
    raw = doc.get("usage")
    if isinstance(raw, dict) and type(raw.get("prompt_tokens")) is int and type(raw.get("completion_tokens")) is int:
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (raw["prompt_tokens"], raw["completion_tokens"])
    if not isinstance(raw, dict) and not isinstance(doc.get("response"), dict):
        assert usage is None


def sse_event(fields: list[tuple[str, str]], newline: str) -> bytes:
    return ("".join(f"{name}:{value}{newline}" for name, value in fields) + newline).encode()


SSE_FIELDS = st.lists(
    st.tuples(
        st.sampled_from(["data", "event", "id", "", "retry"]),
        st.sampled_from([" [DONE]", "", " {", " null"])
        | RESPONSE_DOCS.map(lambda d: " " + json.dumps(d))
        | st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20),
    ),
    min_size=1,
    max_size=3,
)
SSE_STREAMS = st.lists(st.tuples(SSE_FIELDS, st.sampled_from(["\n", "\r\n"])), max_size=6).map(
    lambda events: b"".join(sse_event(f, nl) for f, nl in events)
)
# a stream may end without its blank line: finish() reads the last event anyway
SSE_STREAMS_WITH_TAIL = st.tuples(
    SSE_STREAMS, st.sampled_from([b"", b'data: {"usage": {"prompt_tokens": 3}}', b"\n", b"data: {"])
).map(b"".join)


@CI
@given(case=split(SSE_STREAMS_WITH_TAIL))
def test_sse_usage_is_the_same_for_any_chunking(case: tuple[bytes, list[bytes]]) -> None:
    body, chunks = case
    whole_parser = UsageParser(sse=True)
    whole = feed_all(whole_parser, [body])
    split_parser = UsageParser(sse=True)
    assert as_tuple(feed_all(split_parser, chunks)) == as_tuple(whole)
    # and the last data line that carries usage is the one read (an oracle that splits by hand)
    expected = None
    for line in body.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            try:
                found = oracle_prompt_tokens(orjson.loads(line[5:].strip()))
            except orjson.JSONDecodeError:
                continue
            expected = expected if found is None else found
    assert (whole.prompt_tokens if whole else None) == expected


def oracle_prompt_tokens(doc: Any) -> int | None:
    """The prompt tokens an OpenAI (or Responses API) document reports, or None if it reports none."""
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if (
        not isinstance(usage, dict)
        and doc.get("type") == "response.completed"
        and isinstance(doc.get("response"), dict)
    ):
        usage = doc["response"].get("usage")
    if not isinstance(usage, dict):
        return None
    tokens = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    return tokens if isinstance(tokens, int) else 0


@CI
@given(case=split(st.binary(max_size=600) | SSE_STREAMS), cap=st.integers(min_value=1, max_value=64), sse=st.booleans())
def test_usage_parser_never_holds_more_than_its_cap(case: tuple[bytes, list[bytes]], cap: int, sse: bool) -> None:
    feed_all(UsageParser(sse=sse, max_bytes=cap), case[1])  # feed_all asserts the bound after every chunk


# ---- ModelNameRestorer ---------------------------------------------------------------------


def restore(restorer: ModelNameRestorer, chunks: list[bytes], keep: int) -> bytes:
    out = []
    for i, chunk in enumerate(chunks):
        out.append(restorer.feed(chunk, i == len(chunks) - 1))
        assert len(restorer._tail) <= keep  # "a small tail": shorter than the longest pattern
    return b"".join(out)


def keep_of(target: str) -> int:
    return len(b'"model": ' + orjson.dumps(target)) - 1


@st.composite
def restorer_cases(draw: st.DrawFn) -> tuple[str, str, bytes, list[bytes]]:
    """A target and client name, a body built from pieces of the patterns the restorer looks for, its chunks."""
    target, client = draw(NAMES), draw(NAMES)
    t, c = orjson.dumps(target), orjson.dumps(client)
    old = b'"model":' + t
    pieces = [old, old[1:], b'"model": ' + t, b'model": ' + t, b'"model":', t, c, b'"', b":", b" ", b"{", b"}"]
    body = b"".join(draw(st.lists(st.sampled_from(pieces) | st.binary(max_size=4), max_size=30)))
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=12))
    return target, client, body, chunked(body, cuts)


@settings(CI, max_examples=300)
@given(case=restorer_cases())
# found by this test: a quote the restorer wrote is held back and read again as the start of a match
@example(case=("m", "m-target", b'"model":"m"model":"m"', [b'"model":"m"', b'model":"m"']))
def test_restorer_output_for_any_chunking_equals_the_whole_body(case: tuple[str, str, bytes, list[bytes]]) -> None:
    target, client, body, chunks = case
    keep = keep_of(target)
    whole = restore(ModelNameRestorer(target, client), [body], keep)
    assert restore(ModelNameRestorer(target, client), chunks, keep) == whole


@CI
@given(
    target=NAMES,
    client=NAMES,
    docs=st.lists(RESPONSE_DOCS, min_size=1, max_size=4),
    spaced=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=10),
)
def test_restorer_gives_the_client_its_name_back_in_every_sse_event(
    target: str, client: str, docs: list[dict[str, Any]], spaced: bool, cuts: list[int]
) -> None:
    # `"model": "x"` (Python's json, as vLLM writes it) and `"model":"x"` (orjson)
    dump = (lambda d: json.dumps(d, ensure_ascii=False).encode()) if spaced else orjson.dumps
    body = b"".join(b"data: " + dump({"model": target, **d}) + b"\n\n" for d in docs) + b"data: [DONE]\n\n"
    out = restore(ModelNameRestorer(target, client), chunked(body, cuts), keep_of(target))
    events = [e for e in out.split(b"\n\n") if e and e != b"data: [DONE]"]
    assert len(events) == len(docs)
    for sse, doc in zip(events, docs, strict=True):
        assert orjson.loads(sse.removeprefix(b"data: ")) == {"model": client, **doc}


@CI
@given(case=split(st.binary(max_size=200)))
def test_restorer_leaves_bodies_without_the_target_name_alone(case: tuple[bytes, list[bytes]]) -> None:
    target = "m-target-\x00never"  # orjson writes \u0000: no random bytes contain it
    assert restore(ModelNameRestorer(target, "m"), case[1], keep_of(target)) == case[0]
