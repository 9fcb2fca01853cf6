"""``tokenizer: vllm-tokenize`` on the scheduling side (``ServerTokenizer``, ``TokenizeNeed``):
what a request needs fetched, the cache, the approximate fallback while ids are unknown, and
the profile's parameters.  The HTTP side is ``tests/unit/datalayer/test_tokenize.py``."""

from __future__ import annotations

import random

import pytest

from epp.datalayer.kvevents import KVEventIndex
from epp.errors import ConfigError
from epp.scheduling import build_scheduler, parse_config
from epp.scheduling.blockkeys import BlockKeys, Utf8QuadTokenizer
from epp.scheduling.scorers import GuardedAffinityScorer, PrecisePrefixCacheScorer
from epp.scheduling.tokenizers import ServerTokenizer, TokensPending

from support.kvevents import PROMPT, publish
from support.scheduling import EPS, cands, m, req, store_with

CHAT = (("system", "be brief"), ("user", "hello"))

CONFIG = """
plugins:
- {type: precise-prefix-cache-scorer, parameters: {tokenizer: vllm-tokenize, %s}}
- {type: max-score-picker}
"""


def test_a_prompt_needs_one_call_until_its_ids_are_delivered() -> None:
    tok = ServerTokenizer()
    need = tok.need(req("m", "some prompt"))
    assert need is not None and need.url == "" and need.timeout == 0.05
    assert need.body() == {"model": "m", "prompt": "some prompt", "add_special_tokens": True}
    with pytest.raises(TokensPending):
        tok.token_ids("some prompt")
    need.deliver([7, 8, 9])
    assert tok.need(req("m", "some prompt")) is None
    assert list(tok.token_ids("some prompt")) == [7, 8, 9]
    assert list(tok.token_ids("some prompt", limit=2)) == [7, 8]
    assert tok.need(req("m", "")) is None  # nothing to tokenize


def test_a_chat_is_asked_as_messages_with_the_chat_endpoint_defaults() -> None:
    tok = ServerTokenizer(url="http://127.0.0.1:9/")
    need = tok.need(req("m", "be brief hello", messages=CHAT))
    assert need is not None and need.url == "http://127.0.0.1:9"
    assert need.body() == {
        "model": "m",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        "add_generation_prompt": True,
        "add_special_tokens": False,
    }
    need.deliver([1, 2])
    # the scorer's text for a chat is the tokenizer's key for it, not a rendering epp invented
    assert BlockKeys(tok).request_text("be brief hello", CHAT) == need.key
    assert list(tok.token_ids(need.key)) == [1, 2]
    # a completion cannot write under a chat's key: a prompt that looks like one is never asked for
    assert tok.need(req("m", need.key + "more")) is None
    with pytest.raises(TokensPending):
        tok.token_ids(need.key + "more")


def test_the_cache_keeps_the_most_recent_prompts() -> None:
    tok = ServerTokenizer(cache_size=2)
    for text in ("a", "b"):
        need = tok.need(req("m", text))
        assert need is not None
        need.deliver([1])
    assert tok.need(req("m", "a")) is None  # a is now the most recent
    need = tok.need(req("m", "c"))
    assert need is not None
    need.deliver([3])
    assert len(tok) == 2
    assert tok.need(req("m", "b")) is not None  # b was the oldest: gone
    assert tok.need(req("m", "a")) is None and tok.need(req("m", "c")) is None


def test_the_scorer_uses_the_approximate_index_until_the_ids_come() -> None:
    idx = KVEventIndex(BlockKeys())
    publish(idx, EPS[0].address, 8)
    publish(idx, EPS[1].address, 2)
    tok = ServerTokenizer()
    scorer = PrecisePrefixCacheScorer(keys=BlockKeys(tok), index=idx)
    request = req("base", PROMPT)
    assert scorer.score(request, cands([m()] * 3, prefix=[0.0, 0.5, 0.25])) == [0.0, 0.5, 0.25]
    need = scorer.tokenize_need(request)
    assert need is not None
    need.deliver(Utf8QuadTokenizer().token_ids(PROMPT))  # what epp-sim's /tokenize answers
    assert scorer.tokenize_need(request) is None
    # pods 0 and 1 by what they report; pod 2 publishes nothing: its approximate match stands
    assert scorer.score(request, cands([m()] * 3, prefix=[0.0, 0.5, 0.25])) == [1.0, 0.25, 0.25]


def test_only_a_scorer_bound_to_kv_events_asks_for_ids() -> None:
    scorer = PrecisePrefixCacheScorer(keys=BlockKeys(ServerTokenizer()))
    assert scorer.tokenize_need(req("base", PROMPT)) is None  # no index: it scores on the approximate index anyway
    scorer.index = KVEventIndex(BlockKeys())
    assert scorer.tokenize_need(req("base", PROMPT)) is not None
    assert PrecisePrefixCacheScorer(index=KVEventIndex(BlockKeys())).tokenize_need(req("base", PROMPT)) is None


def test_the_scheduler_collects_the_needs_of_its_server_tokenizers() -> None:
    store = store_with([m(), m()])
    config = parse_config(CONFIG % "tokenizeURL: 'http://127.0.0.1:8000', tokenizeTimeout: 0.2, tokenizeCacheSize: 8")
    idx = KVEventIndex(BlockKeys())
    s = build_scheduler(config, store, rng=random.Random(1), kv_index=idx)
    assert s.tokenizes
    (need,) = s.tokenize_needs(req("base", PROMPT))
    assert (need.url, need.timeout, need.tokenizer.cache_size) == ("http://127.0.0.1:8000", 0.2, 8)
    (scorer,) = [sc for sc, _ in s.profile.scorers]
    inner = scorer.inner if isinstance(scorer, GuardedAffinityScorer) else scorer
    assert isinstance(inner, PrecisePrefixCacheScorer) and inner.keys.tokenizer is need.tokenizer
    # the decision does not wait for it: without the ids it is made on the approximate index
    assert s.schedule(req("base", PROMPT), EPS[:2])
    plain = build_scheduler("epp-precise", store, rng=random.Random(1), kv_index=idx)
    assert not plain.tokenizes and plain.tokenize_needs(req("base", PROMPT)) == []


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
