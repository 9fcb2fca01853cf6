"""The lean wiring (``epp envoy-config`` default): request headers and the whole body go to
epp, then only the response headers; no response chunk crosses epp, yet every claim is
released exactly when the HTTP stream ends, because the end of the HTTP stream closes the
ext_proc stream.  Proven here with real Envoy 1.40 on JSON, SSE, a client that disconnects
mid-stream and an upstream that resets mid-stream; plus the message count, and the one case
where epp asks for a response body after all (a rewritten model name to restore)."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import web

from support import MODELS
from support.gateway import Gateway
from support.upstreams import serve_app, wait_for_arrivals

OPEN = None  # no `models:` section: no rewrite, so nothing asks for a response body
COMPLETION = {"model": "m", "prompt": "Say hello", "max_tokens": 3}


async def idle(gw: Gateway) -> None:
    """The ext_proc stream closed (bounded: a timer-driven close would take 300 s)."""
    async with asyncio.timeout(5):
        await gw.app.servicer.wait_idle()
    assert gw.app.datastore.load.total_inflight() == 0


async def msgs(gw: Gateway) -> tuple[int, int]:
    stats = await gw.envoy.stats(r"ext_proc\.stream_msgs_(sent|received)$")
    sent = sum(v for k, v in stats.items() if k.endswith("sent"))
    received = sum(v for k, v in stats.items() if k.endswith("received"))
    return sent, received


async def test_a_request_is_three_messages_each_way_and_no_response_chunk(gateway):
    gw = await gateway(body_mode="lean", models=OPEN)
    before = await msgs(gw)
    for doc in (COMPLETION, {**COMPLETION, "stream": True}):
        status, _, body = await gw.post(doc)
        assert status == 200 and b"Hello" in body
    await idle(gw)
    sent, received = (a - b for a, b in zip(await msgs(gw), before, strict=True))
    assert (sent, received) == (6, 6)  # per request: headers, body, response headers; and their replies


async def test_the_claim_lasts_exactly_as_long_as_a_json_response(gateway):
    gw = await gateway(body_mode="lean", models=OPEN, refresh_metrics_interval=0)
    for u in gw.upstreams:
        u.hold = asyncio.Event()  # the pod holds its answer
    request = asyncio.create_task(gw.post(COMPLETION))
    await wait_for_arrivals(gw.upstreams, 1, method="POST")
    assert gw.app.datastore.load.total_inflight() == 1 and gw.app.servicer.open_streams == 1
    for u in gw.upstreams:
        u.hold.set()  # type: ignore[union-attr]
    status, _, body = await asyncio.wait_for(request, 10)
    assert status == 200 and b"Hello from" in body
    await idle(gw)


async def test_the_claim_lasts_exactly_as_long_as_an_sse_response(gateway):
    gw = await gateway(body_mode="lean", models=OPEN, refresh_metrics_interval=0)
    for u in gw.upstreams:
        u.hold_body = asyncio.Event()  # pause after the first event
    async with gw.http.post(gw.url + "/v1/completions", json={**COMPLETION, "stream": True}) as r:
        assert r.status == 200
        assert (await r.content.readline()).startswith(b"data: ")  # the response is under way
        assert gw.app.datastore.load.total_inflight() == 1 and gw.app.servicer.open_streams == 1
        for u in gw.upstreams:
            u.hold_body.set()  # type: ignore[union-attr]
        body = await r.read()
    assert body.rstrip().endswith(b"data: [DONE]")
    await idle(gw)


async def test_ext_proc_streams_end_with_a_clean_close_not_a_reset(gateway):
    """epp's bootstrap sets Envoy's ``ext_proc_graceful_grpc_close``: each ext_proc stream is
    half-closed and ends with epp's trailers, never reset (a reset leaks native memory in
    grpc.aio on every stream; ``epp.envoy.config.GRACEFUL_CLOSE``)."""
    gw = await gateway(body_mode="lean", models=OPEN)
    counters = r"cluster\.epp\.upstream_rq_(total|tx_reset)$"
    before = await gw.envoy.stats(counters)
    for doc in (COMPLETION, {**COMPLETION, "stream": True}, COMPLETION):
        status, _, _ = await gw.post(doc)
        assert status == 200
    await idle(gw)
    after = await gw.envoy.stats(counters)
    delta = {k.rsplit(".", 1)[1]: after[k] - before.get(k, 0) for k in after}
    assert delta == {"upstream_rq_total": 3, "upstream_rq_tx_reset": 0}


async def test_a_client_that_gives_up_before_the_response_is_counted_cancelled(gateway):
    """With the graceful close the stream's end is clean even for a request cut off: epp counts
    it from what it saw (no response), not from how the stream ended."""
    gw = await gateway(body_mode="lean", models=OPEN, refresh_metrics_interval=0)
    for u in gw.upstreams:
        u.hold = asyncio.Event()  # the pod never answers while the client waits
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(http.post(gw.url + "/v1/completions", json=COMPLETION))
        await wait_for_arrivals(gw.upstreams, 1, method="POST")
        request.cancel()  # the client goes away before any response header
        with pytest.raises(asyncio.CancelledError):
            await request
    await idle(gw)
    assert gw.value("inference_model_request_error_total", {"model_name": "m", "target_model_name": "m",
                                                             "error_code": "Cancelled"}) == 1  # fmt: skip
    for u in gw.upstreams:
        u.hold.set()  # type: ignore[union-attr]


async def test_a_client_that_disconnects_mid_stream_releases_the_claim(gateway):
    gw = await gateway(body_mode="lean", models=OPEN, refresh_metrics_interval=0)
    for u in gw.upstreams:
        u.hold_body = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        r = await http.post(gw.url + "/v1/completions", json={**COMPLETION, "stream": True})
        assert (await r.content.readline()).startswith(b"data: ")
        assert gw.app.datastore.load.total_inflight() == 1
        r.close()  # the client goes away; the pod is still holding the rest
    await idle(gw)
    for u in gw.upstreams:
        u.hold_body.set()  # type: ignore[union-attr]


async def test_an_upstream_reset_mid_stream_releases_the_claim(gateway):
    client_has_first_event = asyncio.Event()

    async def reset_after_one_event(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"text": "Hel"}]}\n\n')
        await client_has_first_event.wait()
        assert request.transport is not None
        request.transport.abort()  # RST, no end of stream
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", reset_after_one_event)
    runner, port = await serve_app(app)
    try:
        gw = await gateway(n=0, body_mode="lean", models=OPEN, refresh_metrics_interval=0,
                           extra_endpoints=(f"127.0.0.1:{port}",))
        async with gw.http.post(gw.url + "/v1/completions", json={**COMPLETION, "stream": True}) as r:
            assert r.status == 200
            assert (await r.content.readline()).startswith(b"data: ")
            assert gw.app.datastore.load.total_inflight() == 1
            client_has_first_event.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        await idle(gw)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_rewritten_model_name_is_still_restored(gateway, stream):
    """The one time epp needs a response body: it asks for it in its response-headers reply."""
    gw = await gateway(body_mode="lean", models=MODELS)
    status, _, body = await gw.post({**COMPLETION, "stream": stream})
    assert status == 200
    assert b'"model":"m"' in body.replace(b" ", b"") and b"m-target" not in body
    assert gw.upstreams[0].seen + gw.upstreams[1].seen  # the pod did get the target
    sent = [orjson.loads(s.body)["model"] for u in gw.upstreams for s in u.seen]
    assert sent == ["m-target"]
    await idle(gw)
