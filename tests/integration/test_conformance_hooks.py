"""GIE conformance test hooks over real gRPC (``epp serve --conformance-test-hooks``).

``test-epp-endpoint-selection: ip[,ip:port]`` narrows the pick to the designated
endpoints (503 JSON when none is in the pool); the served endpoint Envoy reports in
``envoy.lb`` metadata is echoed in ``x-conformance-test-served-endpoint``.  Off by default:
then the header is an ordinary header and nothing is echoed.
"""

from __future__ import annotations

import orjson
import pytest

from support import MODELS
from support.messages import BUFFERED, request_body, request_headers, response_headers, set_headers

SELECT = "test-epp-endpoint-selection"
SERVED = "x-conformance-test-served-endpoint"
BODY = orjson.dumps({"model": "m", "prompt": "hi"})
PODS = ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.2:8001", "127.0.0.3:8001"]


def _picked(replies) -> str:
    return set_headers(replies[0])["x-gateway-destination-endpoint"]


@pytest.fixture
async def hooked(write_pool, start_app, client_for):
    app = await start_app(write_pool(PODS, models=MODELS), conformance_test_hooks=True,
                          refresh_metrics_interval=0, scheduling_profile="round-robin")
    return app, client_for(app)


SELECTIONS = [
    ("one ip, every port of it", "127.0.0.1", {"127.0.0.1:8001", "127.0.0.1:8002"}),
    ("one ip:port", "127.0.0.1:8002", {"127.0.0.1:8002"}),
    ("two ips", "127.0.0.2, 127.0.0.3", {"127.0.0.2:8001", "127.0.0.3:8001"}),
    ("ip and ip:port", "127.0.0.3,127.0.0.1:8001", {"127.0.0.3:8001", "127.0.0.1:8001"}),
    ("unknown entries are ignored", "10.9.9.9,127.0.0.2", {"127.0.0.2:8001"}),
]


@pytest.mark.parametrize(("selection", "expected"), [s[1:] for s in SELECTIONS], ids=[s[0] for s in SELECTIONS])
async def test_selection_header_limits_the_pick(hooked, selection, expected):
    _, client = hooked
    picked = set()
    for _ in range(8):  # round-robin walks every allowed endpoint
        replies = await client.run([request_headers({SELECT: selection}), request_body(BODY)])
        picked.add(_picked(replies))
    assert picked == expected


async def test_selection_in_buffered_mode(hooked):
    _, client = hooked
    replies = await client.run([request_headers({SELECT: "127.0.0.2"}, mode=BUFFERED), request_body(BODY)])
    assert set_headers(replies[1])["x-gateway-destination-endpoint"] == "127.0.0.2:8001"


NONE_MATCH = [("ip", "10.0.0.1"), ("ip-port", "127.0.0.1:9999"), ("empty", ""), ("commas", " , ")]


@pytest.mark.parametrize("selection", [s for _, s in NONE_MATCH], ids=[i for i, _ in NONE_MATCH])
async def test_no_designated_endpoint_in_the_pool_is_503_json(hooked, selection):
    app, client = hooked
    (reply,) = await client.run([request_headers({SELECT: selection}), request_body(BODY)])
    immediate = reply.immediate_response
    assert immediate.status.code == 503
    assert set_headers(reply)["content-type"] == "application/json"
    error = orjson.loads(immediate.body)["error"]
    assert error["code"] == 503 and SELECT in error["message"]
    await app.servicer.wait_idle()
    assert app.datastore.load.total_inflight() == 0


async def test_a_huge_selection_header_is_not_echoed_back_whole(hooked):
    _, client = hooked
    (reply,) = await client.run([request_headers({SELECT: "10.0.0.1," * 20_000}), request_body(BODY)])
    assert reply.immediate_response.status.code == 503
    assert len(reply.immediate_response.body) < 2_000


async def test_served_endpoint_is_echoed_from_envoys_metadata(hooked):
    _, client = hooked
    call = client.open()
    await client.send(call, request_headers({SELECT: "127.0.0.3"}), 0)
    (headers_reply, _) = await client.send(call, request_body(BODY), 2)
    assert set_headers(headers_reply)["x-gateway-destination-endpoint"] == "127.0.0.3:8001"
    (reply,) = await client.send(call, response_headers(served="127.0.0.3:8001"), 1)
    assert set_headers(reply) == {SERVED: "127.0.0.3:8001"}
    await call.done_writing()


async def test_nothing_is_echoed_when_envoy_reports_nothing(hooked):
    _, client = hooked
    call = client.open()
    await client.send(call, request_headers(), 0)
    await client.send(call, request_body(BODY), 2)
    (reply,) = await client.send(call, response_headers(), 1)
    assert SERVED not in set_headers(reply)
    await call.done_writing()


async def test_hooks_are_off_by_default(write_pool, start_app, client_for):
    app = await start_app(write_pool(PODS, models=MODELS), refresh_metrics_interval=0, scheduling_profile="round-robin")
    client = client_for(app)
    picked = set()
    for _ in range(8):
        replies = await client.run([request_headers({SELECT: "127.0.0.2"}), request_body(BODY)])
        picked.add(_picked(replies))
    assert picked == set(PODS)  # the header is just a header
    call = client.open()
    await client.send(call, request_headers(), 0)
    await client.send(call, request_body(BODY), 2)
    (reply,) = await client.send(call, response_headers(served=PODS[0]), 1)
    assert SERVED not in set_headers(reply)
    await call.done_writing()
