"""OpenAI bodies (``epp/openai.py``): request parsing, model rewrite, usage from JSON and SSE, name restoring."""

from __future__ import annotations

import orjson
import pytest

from epp.errors import BadRequest
from epp.openai import ModelNameRestorer, UsageParser, parse_inference_request, rewrite_model


def parse(doc: object, path: str = "/v1/completions"):
    return parse_inference_request(orjson.dumps(doc), {}, path=path, request_id="r1")[0]


def test_completion_fields():
    r = parse({"model": "m", "prompt": "abcdefgh", "max_tokens": 9, "stream": True,
               "stream_options": {"include_usage": True}})
    assert (r.model, r.target_model, r.prompt, r.prompt_tokens, r.stream) == ("m", "m", "abcdefgh", 2, True)


def test_chat_messages_text_including_parts():
    r = parse({"model": "m", "max_completion_tokens": 100, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "introduce yourself"}, {"type": "image_url"}]},
    ]}, "/v1/chat/completions")
    assert "be brief" in r.prompt and "introduce yourself" in r.prompt
    assert not r.stream


@pytest.mark.parametrize(
    ("body", "path", "match"),
    [
        (b"{oops", "/v1/completions", "not valid JSON"),
        (b"[1]", "/v1/completions", "JSON object"),
        (b'{"prompt": "x"}', "/v1/completions", "model"),
        (b'{"model": 3, "prompt": "x"}', "/v1/completions", "model"),
        (b'{"model": "m"}', "/v1/completions", "prompt"),
        (b'{"model": "m", "messages": []}', "/v1/chat/completions", "messages"),
    ],
)
def test_bad_requests(body, path, match):
    with pytest.raises(BadRequest, match=match):
        parse_inference_request(body, {}, path=path)


def test_other_paths_need_only_a_model():
    assert parse({"model": "m", "input": "x"}, "/v1/embeddings").model == "m"


REWRITES = [
    (b'{"model":"a","prompt":"p","n":1}', b'{"model":"b","prompt":"p","n":1}'),
    # only the value changes: spacing, key order and other bytes are the client's
    (b' { "prompt" : {"model": "nested"}, "model" : "a" , "n":1}',
     b' { "prompt" : {"model": "nested"}, "model" : "b" , "n":1}'),
    (b'{"x":["model","a"],"model":"a"}', b'{"x":["model","a"],"model":"b"}'),
    (b'{"mod\\u0065l":"a","p":"\\"model\\""}', b'{"mod\\u0065l":"b","p":"\\"model\\""}'),
    (b'{"model":"x","model":"a"}', b'{"model":"b","model":"b"}'),  # first-wins and last-wins parsers agree
    (b'{"seed":123456789012345678901234567890,"model":"a"}', b'{"seed":123456789012345678901234567890,"model":"b"}'),
    (b'{"p":"x\\\\","model":"a\\"q"}', b'{"p":"x\\\\","model":"b"}'),
    (b'{"model":"a","deep":' + b"[" * 600 + b"]" * 600 + b"}",
     b'{"model":"b","deep":' + b"[" * 600 + b"]" * 600 + b"}"),
]


@pytest.mark.parametrize(("body", "expected"), REWRITES,
                         ids=["plain", "spacing", "in-array", "escaped-key", "duplicate", "big-int", "escapes", "deep"])
def test_rewrite_model_replaces_only_the_top_level_models_value(body, expected):
    doc = {"model": "a"}  # what parse_inference_request decoded (its other fields do not matter here)
    assert rewrite_model(body, doc, "b") == expected


def test_rewrite_model_falls_back_to_the_document():
    assert orjson.loads(rewrite_model(b"not json at all", {"model": "a", "n": 1}, "b")) == {"model": "b", "n": 1}


def test_usage_from_json_body_in_pieces():
    p = UsageParser(sse=False)
    doc = orjson.dumps({"usage": {"prompt_tokens": 11, "completion_tokens": 22,
                                  "prompt_tokens_details": {"cached_tokens": 5}}})
    p.feed(doc[:7])
    p.feed(doc[7:])
    u = p.finish()
    assert u is not None and (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (11, 22, 5)


@pytest.mark.parametrize("step", [1, 3, 17, 1000])
def test_usage_from_sse_split_anywhere(step):
    stream = (
        b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,'
        b'"prompt_token_details":{"cached_tokens":1}}}\n\n'
        b"data: [DONE]\n\n"
    )
    p = UsageParser(sse=True)
    for i in range(0, len(stream), step):
        p.feed(stream[i : i + step])
    u = p.finish()
    assert u is not None and (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (3, 4, 1)


def _token(i: int, usage: bytes = b"null") -> bytes:
    return b'data: {"choices":[{"delta":{"content":"t%d"}}],"usage":%s}\n\n' % (i, usage)


def test_sse_usage_is_the_last_usage_object_whatever_comes_before():
    final = b'{"prompt_tokens":7,"completion_tokens":50}'
    vllm_include_usage = b"".join(_token(i) for i in range(50)) + _token(50, final) + b"data: [DONE]\n\n"
    continuous = b"".join(_token(i, b'{"prompt_tokens":7,"completion_tokens":%d}' % (i + 1)) for i in range(50))
    broken_last = _token(0, final) + b'data: {"usage":{"prompt_tokens":9,\n\n' + b"data: [DONE]\n\n"
    for body in (vllm_include_usage, continuous, broken_last):
        p = UsageParser(sse=True)
        for i in range(0, len(body), 37):
            p.feed(body[i : i + 37])
        u = p.finish()
        assert u is not None and (u.prompt_tokens, u.completion_tokens) == (7, 50)


def test_sse_usage_after_more_than_the_cap_is_read_from_a_bounded_tail():
    p = UsageParser(sse=True, max_bytes=4096)
    for i in range(2000):  # ~140 KB of token events
        p.feed(_token(i))
        assert len(p._buf) <= 4096
    p.feed(_token(2000, b'{"prompt_tokens":1,"completion_tokens":2001}') + b"data: [DONE]\n\n")
    u = p.finish()
    assert u is not None and u.completion_tokens == 2001


@pytest.mark.parametrize("step", [1000, 4096, 65536])
def test_sse_usage_in_a_line_longer_than_the_kept_tail(step):
    # a Responses API stream: "response.completed" repeats the whole output text before its usage
    text = "word " * 20_000
    deltas = b"".join(
        b'data: {"type":"response.output_text.delta","delta":"word "}\n\n' for _ in range(4000)
    )
    usage = {"input_tokens": 5, "output_tokens": 20_000}
    response = {"output": [{"content": [{"text": text}]}], "usage": usage}
    done = orjson.dumps({"type": "response.completed", "response": response})
    body = deltas + b"data: " + done + b"\n\n"
    p = UsageParser(sse=True)
    for i in range(0, len(body), step):
        p.feed(body[i : i + step])
    u = p.finish()
    assert u is not None and (u.prompt_tokens, u.completion_tokens) == (5, 20_000)


def test_sse_usage_with_carriage_returns_only_past_the_cap():
    body = b"".join(_token(i).replace(b"\n", b"\r") for i in range(6000))  # ~360 KB: past the cap
    body += _token(6000, b'{"prompt_tokens":2,"completion_tokens":6001}').replace(b"\n", b"\r")
    p = UsageParser(sse=True)
    for i in range(0, len(body), 500):
        p.feed(body[i : i + 500])
    u = p.finish()
    assert u is not None and u.completion_tokens == 6001


def test_usage_absent_and_garbage_are_none():
    p = UsageParser(sse=True)
    p.feed(b"data: {nope}\n\ndata: [DONE]\n\n")
    assert p.finish() is None
    q = UsageParser(sse=False, max_bytes=10)
    q.feed(b'{"usage": {"prompt_tokens": 1}}')
    assert q.finish() is None  # over the cap: no usage, no unbounded buffer


def test_responses_api_usage():
    p = UsageParser(sse=True)
    p.feed(b'data: {"type":"response.completed","response":{"usage":{"input_tokens":2,"output_tokens":3}}}\n\n')
    u = p.finish()
    assert u is not None and (u.prompt_tokens, u.completion_tokens) == (2, 3)


@pytest.mark.parametrize("step", [1, 2, 5, 9, 1000])
def test_restorer_handles_matches_split_across_chunks(step):
    data = b'data: {"model":"target-x","a":1}\n\ndata: {"model": "target-x"}\n\n{"model":"other"}'
    r = ModelNameRestorer("target-x", "client")
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    out = b"".join(r.feed(c, i == len(chunks) - 1) for i, c in enumerate(chunks))
    assert out == data.replace(b'"target-x"', b'"client"')


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [([1, 2, 3], 3), ([[1, 2], [3, 4, 5]], 5), ([151_000, 0], 2), (["ab", "cd"], 1)],
    ids=["token-ids", "token-id-batch", "large-vocabulary", "string-batch"],
)
def test_token_id_and_batch_prompts_are_routed(prompt, tokens):
    r = parse({"model": "m", "prompt": prompt})
    assert r.prompt_tokens == tokens


def test_token_id_prompts_share_prefix_blocks_exactly_when_their_ids_do():
    from epp.scheduling.prefix import block_hashes

    a = parse({"model": "m", "prompt": list(range(64)) + [7] * 16}).prompt
    b = parse({"model": "m", "prompt": list(range(64)) + [9] * 16}).prompt
    ha, hb = block_hashes(a, "m", block_tokens=16), block_hashes(b, "m", block_tokens=16)
    assert len(ha) == len(hb) == 5 and ha[:4] == hb[:4] and ha[4] != hb[4]


@pytest.mark.parametrize(
    "prompt", [[None], [True], [], [1, "a"], [[1], "a"], [[]], [-1], [1 << 40], 5, {"a": 1}],
    ids=["null", "bool", "empty", "mixed", "mixed-batch", "empty-inner", "negative", "huge-id", "number", "object"],
)
def test_malformed_prompts_are_400(prompt):
    with pytest.raises(BadRequest, match="'prompt' must be"):
        parse({"model": "m", "prompt": prompt})


def test_a_json_body_too_large_to_keep_still_gives_its_usage_from_the_tail():
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
             "prompt_tokens_details": {"cached_tokens": 2}}
    body = orjson.dumps({"id": "x", "choices": [{"text": "y" * 1_000_000}], "usage": usage})
    parser = UsageParser(sse=False)
    held = 0
    for i in range(0, len(body), 65_536):
        parser.feed(body[i : i + 65_536])
        held = max(held, len(parser._buf))
    got = parser.finish()
    assert got is not None and (got.prompt_tokens, got.completion_tokens, got.cached_tokens) == (7, 3, 2)
    assert held <= 256 * 1024  # the cap, never the megabyte
