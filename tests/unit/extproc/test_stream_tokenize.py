"""A decision that waits on the model server's token ids (``tokenizer: vllm-tokenize``):
``ExtProcStream.handle`` returns a ``Pending`` the servicer awaits.  Driven directly (no gRPC)
with a real scheduler, KV-event index and Router; ``tokenize`` is the test's coroutine in place
of ``epp.datalayer.tokenize.TokenizeClient`` (which has its own tests against a real server).

Checked: the ids are used; a decision comes whether they come or not (nothing delivered, an
exception, a call that never returns); trailers after the body and rejections answer as the
synchronous path does; a stream that ends while waiting leaks no claim."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from epp.datalayer.kvevents import KVEventIndex
from epp.extproc.server import ExtProcServicer
from epp.extproc.stream import ExtProcStream, Pending
from epp.observability.metrics import EppMetrics
from epp.routing import Router
from epp.scheduling import build_scheduler, parse_config
from epp.scheduling.blockkeys import BlockKeys, Utf8QuadTokenizer
from epp.scheduling.tokenizers import TokenizeNeed
from epp.wire import SUBSET_HINT_NAMESPACE, SUBSET_KEY

from support import datastore
from support import messages as msg
from support.kvevents import PROMPT, publish
from support.scheduling import EPS

CONFIG = parse_config("""
plugins:
- {type: precise-prefix-cache-scorer, parameters: {tokenizer: vllm-tokenize, tokenizeTimeout: 0.05}}
- {type: max-score-picker}
""")
BODY = orjson.dumps({"model": "base", "prompt": PROMPT, "max_tokens": 5})
NOWHERE = {SUBSET_HINT_NAMESPACE: {SUBSET_KEY: "127.0.0.99:8000"}}  # a subset hint no endpoint matches: 503
Tokenize = Callable[[TokenizeNeed], Awaitable[None]]


def routing() -> tuple[Router, Any]:
    """A router over EPS[0..2]; EPS[1] reports holding PROMPT's 8 blocks (its KV events)."""
    store = datastore(EPS[:3])
    index = KVEventIndex(BlockKeys())
    publish(index, EPS[1].address, 8)
    return Router(store, build_scheduler(CONFIG, store, rng=random.Random(3), kv_index=index)), store


def stream_on(router: Router, tokenize: Tokenize | None) -> ExtProcStream:
    return ExtProcStream(router, EppMetrics(CollectorRegistry()), max_body_bytes=1 << 20, tokenize=tokenize)


def make(tokenize: Tokenize | None) -> tuple[ExtProcStream, Any]:
    router, store = routing()
    return stream_on(router, tokenize), store


async def delivering(need: TokenizeNeed) -> None:
    need.deliver(Utf8QuadTokenizer().token_ids(PROMPT))  # what epp-sim's /tokenize answers


async def silent(need: TokenizeNeed) -> None:
    """The server answered nothing usable (TokenizeClient delivers nothing on any failure)."""


async def raising(need: TokenizeNeed) -> None:
    raise RuntimeError("a tokenize call that breaks its promise never to raise")


async def hanging(need: TokenizeNeed) -> None:
    await asyncio.Event().wait()  # never returns: the stream's own bound must end the wait


def kinds(out: list[Any]) -> list[str]:
    return [r.WhichOneof("response") for r in out]


async def converse(s: ExtProcStream, messages: list[Any]) -> list[list[str]]:
    """Each message's reply kinds, awaiting a Pending as the servicer does; stops at an ImmediateResponse."""
    got = []
    for message in messages:
        out = s.handle(message)
        if isinstance(out, Pending):
            out = await out.result()
        got.append(kinds(out))
        if s.finished:
            break
    return got


def destination(s: ExtProcStream) -> str:
    assert s.ctx.ticket is not None
    return s.ctx.ticket.address


@pytest.mark.parametrize("mode", [msg.FULL_DUPLEX, msg.BUFFERED], ids=["full-duplex", "buffered"])
async def test_the_decision_waits_for_the_ids_and_uses_them(mode: int) -> None:
    asked: list[TokenizeNeed] = []

    async def tokenize(need: TokenizeNeed) -> None:
        asked.append(need)
        await delivering(need)

    router, store = routing()
    s = stream_on(router, tokenize)
    first = s.handle(msg.request_headers({}, mode=mode))
    assert isinstance(first, list) and kinds(first) == ([] if mode == msg.FULL_DUPLEX else ["request_headers"])
    out = s.handle(msg.request_body(BODY))
    assert isinstance(out, Pending) and not asked  # nothing runs until the servicer awaits it
    replies = await out.result()
    assert len(asked) == 1 and asked[0].body() == {"model": "base", "prompt": PROMPT}
    expected = ["request_headers", "request_body"] if mode == msg.FULL_DUPLEX else ["request_body"]
    assert kinds(replies) == expected
    assert destination(s) == EPS[1].address  # the pod whose events hold the prompt
    assert store.load.total_inflight() == 1
    # the same prompt again: its ids are cached, the decision is made at once
    again = stream_on(router, tokenize)
    again.handle(msg.request_headers({}, mode=mode))
    assert not isinstance(again.handle(msg.request_body(BODY)), Pending) and len(asked) == 1


@pytest.mark.parametrize("tokenize", [silent, raising, hanging], ids=["nothing-delivered", "raises", "hangs"])
async def test_without_the_ids_the_request_is_still_routed(tokenize: Tokenize) -> None:
    s, store = make(tokenize)
    got = await converse(s, [msg.request_headers({}, mode=msg.FULL_DUPLEX), msg.request_body(BODY)])
    assert got == [[], ["request_headers", "request_body"]]
    assert destination(s) in {e.address for e in EPS[:3]} and store.load.total_inflight() == 1
    s.close()
    assert store.load.total_inflight() == 0


TRAILERS = [msg.request_headers({}, mode=msg.FULL_DUPLEX), msg.request_body(BODY, end_of_stream=False),
            msg.request_trailers()]  # fmt: skip


async def test_trailers_come_after_the_deferred_decision_as_without_the_wait() -> None:
    sync, _ = make(None)
    deferred, store = make(delivering)
    expected = await converse(sync, TRAILERS)
    assert expected == [[], [], ["request_headers", "request_body", "request_trailers"]]
    assert await converse(deferred, TRAILERS) == expected
    assert store.load.total_inflight() == 1


@pytest.mark.parametrize("messages", [
    TRAILERS,
    [msg.request_headers({}, mode=msg.FULL_DUPLEX), msg.request_body(BODY)],
], ids=["at-trailers", "at-body-end"])  # fmt: skip
async def test_a_rejection_after_the_wait_answers_as_without_it(messages: list[Any]) -> None:
    hinted = [msg.request_headers({}, mode=msg.FULL_DUPLEX, metadata=NOWHERE), *messages[1:]]
    sync, _ = make(None)
    deferred, store = make(delivering)
    expected = await converse(sync, hinted)
    assert expected[-1] == ["immediate_response"]  # 503: the hint names no endpoint; nothing after it
    assert await converse(deferred, hinted) == expected
    assert deferred.finished and store.load.total_inflight() == 0


async def test_a_stream_that_ends_while_waiting_leaks_no_claim() -> None:
    started = asyncio.Event()

    async def slow(need: TokenizeNeed) -> None:
        started.set()
        await asyncio.Event().wait()

    s, store = make(slow)
    s.handle(msg.request_headers({}, mode=msg.FULL_DUPLEX))
    pending = s.handle(msg.request_body(BODY))
    assert isinstance(pending, Pending)
    task = asyncio.ensure_future(pending.result())
    await started.wait()
    task.cancel()  # the servicer's task is cancelled when Envoy resets the stream
    with pytest.raises(asyncio.CancelledError):
        await task
    s.close(cancelled=True)
    assert s.ctx.ticket is None and store.load.total_inflight() == 0


# ---- the servicer's side: ExtProcServicer.Process races the decision against the stream's end ----


class Stub:
    """The servicer's gRPC context: only ``abort`` is used (on an internal error)."""

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


async def test_a_stream_that_ends_while_the_decision_waits_is_dropped_unrouted() -> None:
    """With Envoy's graceful close a client that leaves shows as the stream's end: the servicer
    stops waiting at once, cancels the fetch, and decides nothing (no claim, no index entry)."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(need: TokenizeNeed) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    router, store = routing()
    metrics = EppMetrics(CollectorRegistry())
    servicer = ExtProcServicer(lambda: ExtProcStream(router, metrics, max_body_bytes=1 << 20, tokenize=slow), metrics)

    async def envoy() -> Any:  # headers, the body, then the half-close once the wait began
        yield msg.request_headers({}, mode=msg.FULL_DUPLEX)
        yield msg.request_body(BODY)
        await started.wait()

    replies = [r async for r in servicer.Process(envoy(), Stub())]
    assert replies == [] and cancelled.is_set()
    assert store.load.total_inflight() == 0 and servicer.open_streams == 0
    routed = metrics.registry.get_sample_value("inference_model_request_total", {"model_name": "base",
                                               "target_model_name": "base"})  # fmt: skip
    assert routed is None  # no decision was made: nothing counted, nothing claimed


async def test_after_the_decision_the_next_message_read_during_the_wait_is_handled() -> None:
    router, store = routing()
    metrics = EppMetrics(CollectorRegistry())
    servicer = ExtProcServicer(lambda: ExtProcStream(router, metrics, max_body_bytes=1 << 20,
                                                     tokenize=delivering), metrics)  # fmt: skip

    async def envoy() -> Any:
        yield msg.request_headers({}, mode=msg.FULL_DUPLEX)
        yield msg.request_body(BODY)
        yield msg.response_headers(200)

    replies = [r async for r in servicer.Process(envoy(), Stub())]
    assert kinds(replies) == ["request_headers", "request_body", "response_headers"]
    assert store.load.total_inflight() == 0 and servicer.open_streams == 0

