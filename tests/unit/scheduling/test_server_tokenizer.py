"""``tokenizer: vllm-tokenize`` on the scheduling side (``ServerTokenizer``, ``TokenizeNeed``):
what a request needs fetched and how it is asked, the cache (its keys and bounds), the
approximate fallback while ids are unknown, and the profile's parameters.  The HTTP side is
``tests/unit/datalayer/test_tokenize.py``; the stream's wait, ``tests/unit/extproc/test_stream_tokenize.py``."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from epp.datalayer.kvevents import KVEventIndex
from epp.domain import InferenceRequest
from epp.errors import ConfigError
from epp.openai import parse_inference_request
from epp.scheduling import build_scheduler, parse_config
from epp.scheduling.blockkeys import BlockKeys, Utf8QuadTokenizer
from epp.scheduling.scorers import GuardedAffinityScorer, PrecisePrefixCacheScorer
from epp.scheduling.tokenizers import ServerTokenizer

from support.kvevents import PROMPT, publish
from support.scheduling import EPS, cands, m, store_with

CONFIG = """
plugins:
- {type: precise-prefix-cache-scorer, parameters: {tokenizer: vllm-tokenize, %s}}
- {type: max-score-picker}
"""


def parse(body: dict[str, Any], path: str = "/v1/completions") -> InferenceRequest:
    return parse_inference_request(orjson.dumps(body), {}, path=path, prompt_source=True)[0]


def completion(prompt: Any, model: str = "m", **extra: Any) -> InferenceRequest:
    return parse({"model": model, "prompt": prompt, **extra})


def chat(messages: list[dict[str, Any]], model: str = "m", **extra: Any) -> InferenceRequest:
    return parse({"model": model, "messages": messages, "max_tokens": 3, **extra}, "/v1/chat/completions")


def test_a_prompt_needs_one_call_until_its_ids_are_delivered() -> None:
    tok = ServerTokenizer()
    request = completion("some prompt")
    need = tok.need(request)
    assert need is not None and need.url == "" and need.timeout == 0.05 and need.model == "m"
    assert need.body() == {"model": "m", "prompt": "some prompt"}  # the server's defaults: special tokens
    assert tok.ids_for(request) is None
    need.deliver([7, 8, 9])
    assert tok.need(request) is None and tok.need(completion("some prompt")) is None
    assert list(tok.ids_for(completion("some prompt")) or ()) == [7, 8, 9]
    assert completion("some prompt", add_special_tokens=False).prompt_source == {
        "prompt": "some prompt", "add_special_tokens": False}  # fmt: skip
    assert tok.need(completion("some prompt", add_special_tokens=False)) is not None  # other ids: another entry


def test_a_chat_is_asked_with_what_shapes_its_rendering_as_the_client_sent_it() -> None:
    messages = [{"role": "system", "content": [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]},
                {"role": "user", "content": "hello", "name": "ann"}]  # fmt: skip
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    request = chat(messages, tools=tools, chat_template_kwargs={"enable_thinking": False}, temperature=0.2)
    need = ServerTokenizer(url="http://127.0.0.1:9/").need(request)
    assert need is not None and need.url == "http://127.0.0.1:9"
    assert need.body() == {"model": "m", "messages": messages, "tools": tools,
                           "chat_template_kwargs": {"enable_thinking": False}}  # fmt: skip


def test_keys_name_the_whole_request_and_its_model() -> None:
    tok = ServerTokenizer()
    victim = chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    crafted = chat([{"role": "system", "content": "be brief\0user\0hello"}])  # NULs are valid in JSON strings
    need = tok.need(crafted)
    assert need is not None
    need.deliver([666, 666])
    assert tok.need(victim) is not None and tok.ids_for(victim) is None  # nothing under the victim's key
    as_prompt = completion("be brief\0user\0hello")
    assert tok.need(as_prompt) is not None  # a completion with the same text is another request
    other_model = chat([{"role": "system", "content": "be brief\0user\0hello"}], model="qwen")
    assert tok.need(other_model) is not None  # another model's tokenizer: its own entry
    reordered = parse({"messages": crafted.prompt_source["messages"], "max_tokens": 3, "model": "m"},  # type: ignore[index]
                      "/v1/chat/completions")  # fmt: skip
    assert tok.need(reordered) is None  # the same request with its fields in another order: the same entry


def test_the_source_is_read_only_when_asked_for() -> None:
    assert parse_inference_request(orjson.dumps({"model": "m", "prompt": "p"}), {})[0].prompt_source is None
    assert completion("p").prompt_source == {"prompt": "p"}


def test_prompts_given_as_ids_need_no_call_and_batches_are_not_keyed() -> None:
    tok = ServerTokenizer()
    ids = completion([5, 6, 7, 8])
    assert ids.prompt_source == {"token_ids": [5, 6, 7, 8]}
    assert tok.need(ids) is None and list(tok.ids_for(ids) or ()) == [5, 6, 7, 8]
    for batch in (completion(["a", "b"]), completion([[1, 2], [3]])):
        assert batch.prompt_source is None and tok.need(batch) is None and tok.ids_for(batch) is None


def test_the_cache_is_bounded_by_prompts_and_by_ids() -> None:
    tok = ServerTokenizer(cache_size=2, cache_ids=10, max_ids=6)
    a, b, c = completion("a"), completion("b"), completion("c")
    for r in (a, b):
        need = tok.need(r)
        assert need is not None
        need.deliver([1, 2, 3, 4, 5, 6, 7, 8])  # kept: the first max_ids (6)
    assert len(tok) == 1 and tok.held_ids == 6  # 12 ids would pass cache_ids: a went
    assert tok.ids_for(a) is None and list(tok.ids_for(b) or ()) == [1, 2, 3, 4, 5, 6]
    for r in (a, c):
        need = tok.need(r)
        assert need is not None
        need.deliver([9])
    assert len(tok) == 2 and tok.held_ids == 2  # a and c (1 id each); b was the oldest of three
    assert tok.need(b) is not None and tok.need(a) is None and tok.need(c) is None


def test_the_scorer_uses_the_approximate_index_until_the_ids_come() -> None:
    idx = KVEventIndex(BlockKeys())
    publish(idx, EPS[0].address, 8)
    publish(idx, EPS[1].address, 2)
    tok = ServerTokenizer()
    scorer = PrecisePrefixCacheScorer(keys=BlockKeys(tok), index=idx)
    request = completion(PROMPT, model="base")
    assert scorer.score(request, cands([m()] * 3, prefix=[0.0, 0.5, 0.25])) == [0.0, 0.5, 0.25]
    need = scorer.tokenize_need(request)
    assert need is not None
    need.deliver(Utf8QuadTokenizer().token_ids(PROMPT))  # what epp-sim's /tokenize answers
    assert scorer.tokenize_need(request) is None
    # pods 0 and 1 by what they report; pod 2 publishes nothing: its approximate match stands
    assert scorer.score(request, cands([m()] * 3, prefix=[0.0, 0.5, 0.25])) == [1.0, 0.25, 0.25]


def test_only_a_scorer_bound_to_kv_events_asks_for_ids() -> None:
    scorer = PrecisePrefixCacheScorer(keys=BlockKeys(ServerTokenizer()))
    assert scorer.tokenize_need(completion(PROMPT)) is None  # no index: it scores on the approximate index anyway
    scorer.index = KVEventIndex(BlockKeys())
    assert scorer.tokenize_need(completion(PROMPT)) is not None
    assert PrecisePrefixCacheScorer(index=KVEventIndex(BlockKeys())).tokenize_need(completion(PROMPT)) is None


def test_the_scheduler_collects_the_needs_of_its_server_tokenizers() -> None:
    store = store_with([m(), m()])
    config = parse_config(CONFIG % "tokenizeURL: 'http://127.0.0.1:8000', tokenizeTimeout: 0.2, tokenizeCacheSize: 8")
    idx = KVEventIndex(BlockKeys())
    s = build_scheduler(config, store, rng=random.Random(1), kv_index=idx)
    assert s.tokenizes
    (need,) = s.tokenize_needs(completion(PROMPT, model="base"))
    assert (need.url, need.timeout, need.tokenizer.cache_size) == ("http://127.0.0.1:8000", 0.2, 8)
    (scorer,) = [sc for sc, _ in s.profile.scorers]
    inner = scorer.inner if isinstance(scorer, GuardedAffinityScorer) else scorer
    assert isinstance(inner, PrecisePrefixCacheScorer) and inner.keys.tokenizer is need.tokenizer
    # the decision does not wait for it: without the ids it is made on the approximate index
    assert s.schedule(completion(PROMPT, model="base"), EPS[:2])
    unbound = build_scheduler(config, store, rng=random.Random(1))  # no KV events: nothing to ask for
    assert not unbound.tokenizes and unbound.tokenize_needs(completion(PROMPT)) == []
    plain = build_scheduler("epp-precise", store, rng=random.Random(1), kv_index=idx)
    assert not plain.tokenizes and plain.tokenize_needs(completion(PROMPT)) == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("tokenizeURL: '127.0.0.1:8000'", "tokenizeURL must be an http:// URL"),
        ("tokenizeURL: 5", "tokenizeURL must be an http:// URL"),
        ("tokenizeURL: 'https://vllm:8000'", "tokenizeURL must be an http:// URL"),
        ("tokenizeTimeout: 0", "tokenizeTimeout must be above 0 and at most 5 seconds"),
        ("tokenizeTimeout: 30", "tokenizeTimeout must be above 0 and at most 5 seconds"),
        ("tokenizeCacheSize: 0", "tokenizeCacheSize must be a number >= 1"),
    ],
    ids=["url-without-scheme", "url-not-text", "https", "zero-timeout", "long-timeout", "empty-cache"],
)
def test_bad_tokenizer_parameters_are_config_errors(params: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_scheduler(parse_config(CONFIG % params), store_with([m()]), rng=random.Random(1))
