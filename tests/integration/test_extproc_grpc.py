"""ext_proc driven directly over real gRPC streams (no Envoy): message sequences,
rejections, response accounting, cancellation, health and reflection."""

from __future__ import annotations

import asyncio

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from support import MODEL_LABELS, MODELS, value
from support.messages import (
    BUFFERED,
    ExtProcClient,
    lb_metadata,
    request_body,
    request_headers,
    request_trailers,
    response_body,
    response_headers,
    response_trailers,
    set_headers,
)

A, B = "127.0.0.1:18001", "127.0.0.1:18002"


def body_of(model: str = "m", **extra: object) -> bytes:
    return orjson.dumps({"model": model, "prompt": "hello world", "max_tokens": 5, **extra})


async def finish(app, call) -> None:
    """Half-close the stream, expect epp to end it, and nothing to stay in flight."""
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    await app.servicer.wait_idle()
    assert app.datastore.load.total_inflight() == 0


@pytest.fixture
async def app(write_pool, start_app):
    # nothing listens at A and B: with scraping off, epp has no reason to think them down
    return await start_app(write_pool([A, {"address": B, "name": "pod-b"}], models=MODELS), refresh_metrics_interval=0)


@pytest.fixture
def client(app, client_for):
    return client_for(app)


async def test_full_duplex_defers_headers_until_body_end_and_rewrites_model(app, client):
    call = client.open()
    await call.write(request_headers({"content-length": "999"}))
    body = body_of()
    await call.write(request_body(body[:10], end_of_stream=False))
    await call.write(request_body(body[10:], end_of_stream=False))
    await call.write(request_body(b"", end_of_stream=True))  # Envoy's empty final chunk
    headers_reply = await call.read()
    assert headers_reply.WhichOneof("response") == "request_headers"
    assert headers_reply.request_headers.response.clear_route_cache
    hdrs = set_headers(headers_reply)
    primary = hdrs["x-gateway-destination-endpoint"]
    assert primary in (A, B)
    lb = lb_metadata(headers_reply)["envoy.lb"]["x-gateway-destination-endpoint"].split(",")
    assert lb[0] == primary and set(lb) == {A, B}
    body_reply = await call.read()
    streamed = body_reply.request_body.response.body_mutation.streamed_response
    assert streamed.end_of_stream
    sent = orjson.loads(streamed.body)
    assert sent["model"] == "m-target" and sent["prompt"] == "hello world"
    assert hdrs["content-length"] == str(len(streamed.body))
    assert "x-request-id" in hdrs
    assert app.datastore.load.inflight(primary) == 1
    # response path: status, JSON usage, reverse rewrite, pass-through chunking
    r = await client.send(call, response_headers(200, {"content-type": "application/json"}), 1)
    assert r[0].WhichOneof("response") == "response_headers"
    out = orjson.dumps({"model": "m-target", "usage": {"prompt_tokens": 3, "completion_tokens": 5}})
    r = await client.send(call, response_body(out, end_of_stream=True), 1)
    returned = r[0].response_body.response.body_mutation.streamed_response
    assert orjson.loads(returned.body)["model"] == "m" and returned.end_of_stream
    await finish(app, call)
    assert value(app, "inference_model_request_total", MODEL_LABELS) == 1
    assert value(app, "inference_model_output_tokens_sum", MODEL_LABELS) == 5
    assert value(app, "inference_model_input_tokens_sum", MODEL_LABELS) == 3
    assert value(app, "inference_model_running_requests", {"model_name": "m"}) == 0


async def test_large_body_is_rechunked_at_62000_bytes(app, client):
    big = orjson.dumps({"model": "m", "prompt": "x" * 150_000})
    replies = await client.run([request_headers(), request_body(big, end_of_stream=True)])
    chunks = [r.request_body.response.body_mutation.streamed_response for r in replies[1:]]
    assert [len(c.body) <= 62_000 for c in chunks] == [True] * len(chunks) and len(chunks) == 3
    assert [c.end_of_stream for c in chunks] == [False, False, True]
    assert orjson.loads(b"".join(c.body for c in chunks))["prompt"] == "x" * 150_000


async def test_duplex_with_trailers_ends_body_without_eos_then_answers_trailers(app, client):
    replies = await client.run([request_headers(), request_body(body_of(), end_of_stream=False), request_trailers()])
    kinds = [r.WhichOneof("response") for r in replies]
    assert kinds == ["request_headers", "request_body", "request_trailers"]
    assert not replies[1].request_body.response.body_mutation.streamed_response.end_of_stream


async def test_buffered_mode_answers_headers_at_once_and_routes_in_body_reply(app, client):
    call = client.open()
    first = await client.send(call, request_headers(mode=BUFFERED), 1)
    assert first[0].WhichOneof("response") == "request_headers"
    assert not set_headers(first[0])
    body = body_of()
    (reply,) = await client.send(call, request_body(body, end_of_stream=True), 1)
    common = reply.request_body.response
    hdrs = set_headers(reply)
    assert hdrs["x-gateway-destination-endpoint"] in (A, B) and common.clear_route_cache
    assert orjson.loads(common.body_mutation.body)["model"] == "m-target"
    assert hdrs["content-length"] == str(len(common.body_mutation.body))
    assert "envoy.lb" in lb_metadata(reply)
    await finish(app, call)


async def test_bodyless_get_is_routed_on_headers(app, client):
    replies = await client.run([request_headers({"x-request-id": "abc"}, method="GET", path="/v1/models",
                                                end_of_stream=True)])
    assert len(replies) == 1
    hdrs = set_headers(replies[0])
    assert hdrs["x-gateway-destination-endpoint"] in (A, B)
    assert "x-request-id" not in hdrs  # kept as sent


@pytest.mark.parametrize(
    ("messages", "status", "reason"),
    [
        ([request_headers(), request_body(b"{not json", True)], 400, "invalid_request_error"),
        ([request_headers(), request_body(b'{"prompt": "x"}', True)], 400, "invalid_request_error"),
        ([request_headers(), request_body(body_of("unknown"), True)], 404, "model_not_found"),
        ([request_headers({"content-length": str(32 << 20)})], 413, "invalid_request_error"),
        ([request_headers(), request_body(b"x" * 70_000, False)], 413, "invalid_request_error"),
        ([request_headers(metadata={"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": []}}),
          request_body(body_of(), True)], 503, "service_unavailable"),
        ([request_headers(metadata={"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": "10.0.0.9"}}),
          request_body(body_of(), True)], 503, "service_unavailable"),
        # 4 pseudo + content-length + 95 = 100 headers: epp's destination header would be the 101st
        ([request_headers({"content-length": "40", **{f"x-h{i}": "v" for i in range(95)}}),
          request_body(body_of(), True)], 431, "invalid_request_error"),
    ],
    ids=["bad-json", "no-model", "unknown-model", "content-length-too-big", "body-too-big", "empty-subset",
         "subset-no-match", "headers-at-the-limit"],
)
async def test_rejections_are_immediate_json_errors_and_leak_nothing(
    write_pool, start_app, client_for, messages, status, reason
):
    app = await start_app(write_pool([A, B], models=MODELS), max_body_bytes=65_536)
    replies = await client_for(app).run(messages)
    assert len(replies) == 1
    imm = replies[0].immediate_response
    assert imm.status.code == status
    assert set_headers(replies[0])["content-type"] == "application/json"
    err = orjson.loads(imm.body)["error"]
    assert err["type"] == reason and err["code"] == status and err["message"]
    await app.servicer.wait_idle()
    assert app.datastore.load.total_inflight() == 0


async def test_no_endpoints_gives_503(write_pool, start_app, client_for):
    app = await start_app(write_pool([]))
    replies = await client_for(app).run([request_headers(method="GET", end_of_stream=True)])
    assert replies[0].immediate_response.status.code == 503


@pytest.mark.parametrize("hint", [[B], f"{B}, 10.0.0.1:1", "127.0.0.1"], ids=["list", "comma-string", "ip-only"])
async def test_subset_hint_restricts_candidates(write_pool, start_app, client_for, hint):
    # nothing listens at A and B: scraping off, or epp would (rightly) stop picking them
    app = await start_app(write_pool([A, B]), refresh_metrics_interval=0)
    client = client_for(app)
    seen = set()
    for _ in range(10):
        replies = await client.run([
            request_headers(metadata={"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": hint}}),
            request_body(body_of(), True),
        ])
        seen.add(set_headers(replies[0])["x-gateway-destination-endpoint"])
    assert seen == ({A, B} if hint == "127.0.0.1" else {B})


async def test_least_inflight_spreads_concurrent_requests(app, client):
    calls = []
    picked = []
    for _ in range(4):
        call = client.open()
        await call.write(request_headers())
        replies = await client.send(call, request_body(body_of(), True), 2)
        picked.append(set_headers(replies[0])["x-gateway-destination-endpoint"])
        calls.append(call)
    assert sorted(picked) == sorted([A, A, B, B])
    assert app.datastore.load.inflight(A) == 2 and app.datastore.load.inflight(B) == 2
    for call in calls:
        call.cancel()
    await app.servicer.wait_idle()
    assert app.datastore.load.total_inflight() == 0


async def test_sse_usage_split_across_chunks_is_counted(app, client):
    call = client.open()
    await call.write(request_headers())
    await client.send(call, request_body(body_of(stream=True, stream_options={"include_usage": True}), True), 2)
    await client.send(call, response_headers(200, {"content-type": "text/event-stream"}), 1)
    events = (
        b'data: {"model":"m-target","choices":[{"text":"hi"}]}\n\n'
        b'data: {"model":"m-target","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":7,'
        b'"prompt_token_details":{"cached_tokens":2}}}\n\ndata: [DONE]\n\n'
    )
    out = b""
    for i in range(0, len(events), 13):  # split events at awkward places
        chunk = events[i : i + 13]
        (r,) = await client.send(call, response_body(chunk, end_of_stream=False), 1)
        out += r.response_body.response.body_mutation.streamed_response.body
    (r,) = await client.send(call, response_body(b"", end_of_stream=True), 1)
    out += r.response_body.response.body_mutation.streamed_response.body
    assert out == events.replace(b'"model":"m-target"', b'"model":"m"')
    await finish(app, call)
    assert value(app, "inference_model_output_tokens_sum", MODEL_LABELS) == 7


async def test_response_chunks_pass_through_unchanged_without_rewrite(write_pool, start_app, client_for):
    app = await start_app(write_pool([A]))
    client = client_for(app)
    call = client.open()
    await call.write(request_headers())
    await client.send(call, request_body(body_of(), True), 2)
    await client.send(call, response_headers(200), 1)
    for chunk, eos in ((b'{"model":"m",', False), (b'"x":1}', True)):
        (r,) = await client.send(call, response_body(chunk, eos), 1)
        assert r.response_body.response.body_mutation.streamed_response.body == chunk
    await finish(app, call)


@pytest.mark.parametrize("where", ["mid-body", "after-routing", "mid-response"])
async def test_cancellation_never_leaks_inflight(app, client, where):
    call = client.open()
    await call.write(request_headers())
    if where == "mid-body":
        await call.write(request_body(b'{"model":', end_of_stream=False))
    else:
        await client.send(call, request_body(body_of(), True), 2)
        assert app.datastore.load.total_inflight() == 1
        if where == "mid-response":
            await client.send(call, response_headers(200), 1)
            await client.send(call, response_body(b"partial", False), 1)
    call.cancel()
    await asyncio.wait_for(app.servicer.wait_idle(), 5)
    assert app.datastore.load.total_inflight() == 0
    assert value(app, "inference_model_running_requests", {"model_name": "m"}) == 0


async def test_served_endpoint_reported_by_envoy_takes_the_inflight_claim(app, client):
    call = client.open()
    await call.write(request_headers(metadata={"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": [A]}}))
    replies = await client.send(call, request_body(body_of(), True), 2)
    assert set_headers(replies[0])["x-gateway-destination-endpoint"] == A
    assert app.datastore.load.inflight(A) == 1
    await client.send(call, response_headers(200, served=B), 1)
    assert app.datastore.load.inflight(A) == 0 and app.datastore.load.inflight(B) == 1
    await client.send(call, response_body(b"{}", True), 1)
    assert app.datastore.load.total_inflight() == 0
    await finish(app, call)


async def test_response_trailers_end_the_request(app, client):
    replies = await client.run([
        request_headers(), request_body(body_of(), True), response_headers(200),
        response_body(b"{}", False), response_trailers(),
    ])
    assert replies[-1].WhichOneof("response") == "response_trailers"
    assert app.datastore.load.total_inflight() == 0


async def test_upstream_error_status_is_counted(app, client):
    await client.run([request_headers(), request_body(body_of(), True), response_headers(500, end_of_stream=True)])
    await app.servicer.wait_idle()
    assert value(app, "inference_model_request_error_total",
                 {"model_name": "m", "target_model_name": "m-target", "error_code": "500"}) == 1


async def test_health_reports_serving_for_every_probe_name(app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "liveness", "readiness", "inference-extension",
                     "envoy.service.ext_proc.v3.ExternalProcessor"):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, name


async def test_reflection_lists_ext_proc(app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def one():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        responses = [resp async for resp in stub.ServerReflectionInfo(one())]
    assert len(responses) == 1  # one answer to the one request (an empty stream would pass a loop of asserts)
    names = {s.name for s in responses[0].list_services_response.service}
    assert "envoy.service.ext_proc.v3.ExternalProcessor" in names


async def test_pool_file_change_adds_and_removes_endpoints(write_pool, start_app, client_for):
    path = write_pool([A])
    app = await start_app(path)
    assert [e.address for e in app.datastore.endpoints()] == [A]
    write_pool([B])
    app.discovery.changed.clear()
    await asyncio.wait_for(app.discovery.changed.wait(), 5)
    assert [e.address for e in app.datastore.endpoints()] == [B]
    replies = await client_for(app).run([request_headers(method="GET", end_of_stream=True)])
    assert set_headers(replies[0])["x-gateway-destination-endpoint"] == B


async def test_a_pool_file_emptied_by_mistake_is_ignored(write_pool, start_app, client_for, caplog):
    path = write_pool([A])
    app = await start_app(path)
    write_pool([])  # a typo while editing: no endpoint left
    assert not await app.discovery.check_once()
    assert [e.address for e in app.datastore.endpoints()] == [A]
    assert "would empty the running pool" in caplog.text
    replies = await client_for(app).run([request_headers(method="GET", end_of_stream=True)])
    assert set_headers(replies[0])["x-gateway-destination-endpoint"] == A


async def test_metrics_endpoint_exports_the_reference_names(app, client):
    import aiohttp

    await client.run([request_headers(), request_body(body_of(), True), response_headers(200),
                      response_body(orjson.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 2}}), True)])
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{app.metrics_port}/metrics") as r:
        text = await r.text()
    for name in ("inference_model_request_total", "inference_model_request_error_total",
                 "inference_model_request_duration_seconds_bucket", "inference_model_input_tokens_bucket",
                 "inference_model_output_tokens_bucket", "inference_model_running_requests",
                 "inference_pool_ready_pods", "inference_extension_scheduler_e2e_duration_seconds_bucket"):
        assert name in text, name
    assert 'inference_pool_ready_pods{name="test-pool"} 0.0' in text  # nothing answers /metrics there
    assert 'inference_model_request_total{model_name="m",target_model_name="m-target"} 1.0' in text


async def test_request_id_is_generated_when_absent_and_kept_when_present(app, client):
    (r,) = await client.run([request_headers(method="GET", end_of_stream=True)])
    generated = set_headers(r)["x-request-id"]
    assert len(generated) == 36 and generated.count("-") == 4
    (r,) = await client.run([request_headers({"x-request-id": "mine"}, method="GET", end_of_stream=True)])
    assert "x-request-id" not in set_headers(r)


async def test_cert_path_is_loaded_and_served(write_pool, start_app, tmp_path):
    from epp.extproc.tls import self_signed

    key, cert = self_signed("localhost")
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.crt").write_bytes(cert)
    app = await start_app(write_pool([A]), secure_serving=True, cert_path=str(tmp_path))
    creds = grpc.ssl_channel_credentials(root_certificates=cert)  # verify against exactly that cert
    async with grpc.aio.secure_channel(f"localhost:{app.grpc_port}", creds) as ch:
        (r,) = await ExtProcClient(ch).run([request_headers(method="GET", end_of_stream=True)])
    assert set_headers(r)["x-gateway-destination-endpoint"] == A


async def test_request_headers_twice_on_one_stream_is_400_and_holds_one_claim_at_most(app, client):
    call = client.open()
    (first,) = await client.send(call, request_headers(method="GET", end_of_stream=True), 1)
    assert set_headers(first)["x-gateway-destination-endpoint"] in (A, B)
    assert app.datastore.load.total_inflight() == 1
    (second,) = await client.send(call, request_headers(method="GET", end_of_stream=True), 1)
    assert second.WhichOneof("response") == "immediate_response"
    assert second.immediate_response.status.code == 400
    assert "twice" in orjson.loads(second.immediate_response.body)["error"]["message"]
    await finish(app, call)  # the stream ends and the one claim it held is released


@pytest.mark.parametrize(("routed", "status"), [(False, 403), (True, None)])
async def test_admin_paths_get_403_unless_the_operator_routes_them(write_pool, start_app, client_for, routed, status):
    app = await start_app(write_pool([A]), refresh_metrics_interval=0, route_admin_paths=routed)
    replies = await client_for(app).run([request_headers(method="POST", path="/v1/load_lora_adapter",
                                                         end_of_stream=True)])
    if status is None:
        assert set_headers(replies[0])["x-gateway-destination-endpoint"] == A
    else:
        assert replies[0].immediate_response.status.code == status
    assert app.datastore.load.total_inflight() == 0


async def test_a_pods_404_asks_for_its_served_models_to_be_read_again(write_pool, start_app, client_for):
    app = await start_app(write_pool([A]), refresh_metrics_interval=0)
    client = client_for(app)
    call = client.open()
    await client.send(call, request_headers(end_of_stream=False), 0)
    await client.send(call, request_body(body_of(), end_of_stream=True), 2)  # headers reply + body reply
    assert not app.datastore.take_served_refresh(A)
    await client.send(call, response_headers(404), 1)
    assert app.datastore.take_served_refresh(A) and not app.datastore.take_served_refresh(A)
    await call.done_writing()
