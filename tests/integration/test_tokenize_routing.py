"""``tokenizer: vllm-tokenize`` through ``epp serve``'s wiring: an in-process App over gRPC
(and once behind real Envoy) asks a pod's own ``POST /tokenize`` (epp-sim, vLLM's shape) for
a request's token ids before the decision, and routes a chat on the blocks the pods' KV
events report; when no answer comes (nothing listening, or too late) the request is still
routed, on the approximate index.

No sleeps: the test waits until each publisher has seen its subscriber and until the
subscriber has applied what a pod published, each bounded by a deadline.  The one timed
wait is the timeout case, which waits for epp's own ``tokenizeTimeout`` (50 ms).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from epp.app import App
from epp.config import load_pool_file
from epp.envoy.config import render_bootstrap
from epp.envoy.process import EnvoyProcess
from epp_sim.domain import EngineConfig
from epp_sim.profiles import FAST
from epp_sim.server import PodConfig, SimPod

from support import value
from support.messages import (
    ExtProcClient,
    lb_metadata,
    request_body,
    request_headers,
    set_headers,
)
from support.sim import text_of
from support.upstreams import serve_app

MODEL = "/model/llama2"
DEADLINE = 10.0
PODS = 3

CONFIG = """
plugins:
- {type: estimated-queue-scorer, parameters: {queueScale: 4}}
- {type: precise-prefix-cache-scorer, parameters: {affinityMaxExtraLoad: 4, tokenizer: vllm-tokenize%s}}
- {type: max-score-picker}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: estimated-queue-scorer, weight: 2}
  - {pluginRef: precise-prefix-cache-scorer, weight: 5}
  - {pluginRef: max-score-picker}
"""


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def pods() -> AsyncIterator[list[SimPod]]:
    """Pods on 127.0.0.2.. publishing KV events on one port, each on its own IP (as in a cluster)."""
    port = free_port("127.0.0.2")
    started = [
        SimPod(PodConfig(name=f"tok-{i}", engine=EngineConfig(profile=FAST, num_gpu_blocks=4096),
                         kv_events_endpoint=f"tcp://127.0.0.{i + 2}:{port}"))
        for i in range(PODS)
    ]  # fmt: skip
    try:
        for i, pod in enumerate(started):
            await pod.start(host=f"127.0.0.{i + 2}")
        started[0].kv_port = port  # type: ignore[attr-defined]  # the App subscribes to this port on each IP
        yield started
    finally:
        for pod in started:
            await pod.aclose()


Start = Callable[..., Any]


@pytest.fixture
def start_epp(write_pool, start_app, tmp_path: Path, pods: list[SimPod]) -> Start:
    async def start(extra: str | None = None) -> App:
        """``extra``: parameters added to CONFIG's precise scorer; None: the built-in ``epp-precise-vllm``."""
        if extra is None:
            profile: dict[str, str] = {"scheduling_profile": "epp-precise-vllm"}
        else:
            config = tmp_path / "epp-config.yaml"
            config.write_text(CONFIG % extra)
            profile = {"config_file": str(config)}
        app: App = await start_app(
            write_pool([p.address for p in pods], models=[{"modelName": MODEL}]),
            kv_events_port=pods[0].kv_port,  # type: ignore[attr-defined]
            refresh_metrics_interval=0,
            **profile,
        )
        for pod in pods:
            assert pod.kv_events is not None
            await asyncio.wait_for(pod.kv_events.subscribed(), DEADLINE)
        return app

    return start


def chat(system: str, question: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return {"model": MODEL, "messages": messages, "max_tokens": 2}


async def routed(client: ExtProcClient, body: dict[str, Any]) -> str:
    """The pod epp picks for a chat request (full duplex: one headers reply with the destination)."""
    call = client.open()
    await call.write(request_headers({"x-request-id": "t"}, path="/v1/chat/completions"))
    await call.write(request_body(orjson.dumps(body)))
    reply = await asyncio.wait_for(call.read(), DEADLINE)
    destination = set_headers(reply)["x-gateway-destination-endpoint"]
    assert lb_metadata(reply)["envoy.lb"]["x-gateway-destination-endpoint"].startswith(destination)
    call.cancel()
    return destination


def tokenize_calls(pods: list[SimPod]) -> int:
    return sum(p.tokenize_received for p in pods)


def outcomes(app: App, outcome: str) -> float:
    return value(app, "epp_tokenize_duration_seconds_count", {"outcome": outcome})


async def until_idle(app: App) -> None:
    """Every stream's claim released (a cancelled stream releases as it closes)."""
    async with asyncio.timeout(DEADLINE):
        await app.servicer.wait_idle()
    assert app.datastore.load.total_inflight() == 0


async def test_a_chat_routes_on_the_blocks_the_servers_own_ids_name(start_epp, pods, client_for) -> None:
    app = await start_epp()
    homes = [pods[2], pods[0], pods[1], pods[2]]  # one application (system prompt) each
    systems = [text_of(400, f"[assistant {i}] ") for i in range(len(homes))]  # 100 blocks each once rendered
    async with aiohttp.ClientSession() as http:  # straight to the pods: epp never sees these
        for system, home in zip(systems, homes, strict=True):
            async with http.post(home.url + "/v1/chat/completions", json=chat(system, "first question")) as r:
                assert r.status == 200, await r.text()
    for pod in pods:
        assert pod.kv_events is not None
        await asyncio.wait_for(app.kv_subscriber.received(pod.address, pod.kv_events.seq), DEADLINE)
    client = client_for(app)
    picks = [await routed(client, chat(system, f"question {n}")) for n in range(2) for system in systems]
    # on the approximate index (what epp itself sent: nothing), each application would stick to
    # the pod its first pick happened to be: all four right by chance once in 81
    assert picks == [home.address for home in homes] * 2
    assert tokenize_calls(pods) == 8 and outcomes(app, "ok") == 8
    assert await routed(client, chat(systems[0], "question 1")) == homes[0].address
    assert tokenize_calls(pods) == 8  # a prompt seen before is not asked again
    await until_idle(app)


async def test_through_real_envoy_chats_reach_the_pods_holding_their_prefixes(start_epp, pods, write_pool) -> None:
    """The same with Envoy in front (the default lean wiring): the client's chats are answered
    by the pods whose events hold their system prompts; epp asked the pods' /tokenize first."""
    app = await start_epp()
    homes = [pods[2], pods[0]]
    systems = [text_of(400, f"[router docs {i}] ") for i in range(len(homes))]
    envoy = EnvoyProcess(render_bootstrap(load_pool_file(write_pool([p.address for p in pods], name="envoy.yaml")),
                                          listen_port=0, epp_address=f"127.0.0.1:{app.grpc_port}"))  # fmt: skip
    await envoy.start()
    try:
        url = "http://" + await envoy.listener_address()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as http:
            for system, home in zip(systems, homes, strict=True):  # straight to the pods: bypasses epp
                async with http.post(home.url + "/v1/chat/completions", json=chat(system, "first")) as r:
                    assert r.status == 200
            for pod in pods:
                assert pod.kv_events is not None
                await asyncio.wait_for(app.kv_subscriber.received(pod.address, pod.kv_events.seq), DEADLINE)
            served = []
            for n in range(2):
                for system in systems:
                    async with http.post(url + "/v1/chat/completions", json=chat(system, f"question {n}")) as r:
                        assert r.status == 200, await r.text()
                        served.append(r.headers["x-sim-pod"])
        assert served == [home.name for home in homes] * 2  # on the approximate index: right once in 9
        assert tokenize_calls(pods) == 4 and outcomes(app, "ok") == 4
        await until_idle(app)
    finally:
        await envoy.aclose()


@pytest.fixture
async def stuck_server() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A /tokenize that answers only once the test lets it."""
    release = asyncio.Event()

    async def tokenize(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"tokens": []})

    app = web.Application()
    app.router.add_post("/tokenize", tokenize)
    runner, port = await serve_app(app)
    try:
        yield f"http://127.0.0.1:{port}", release
    finally:
        release.set()
        await runner.cleanup()


@pytest.mark.parametrize("failure", ["nothing-listening", "too-late"])
async def test_without_an_answer_the_request_is_still_routed(start_epp, pods, client_for, stuck_server,
                                                             failure: str) -> None:  # fmt: skip
    url, _ = stuck_server
    if failure == "nothing-listening":
        url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    app = await start_epp(f", tokenizeURL: '{url}', tokenizeTimeout: 0.05")
    client = client_for(app)
    addresses = {p.address for p in pods}
    for n in range(3):
        assert await routed(client, chat(text_of(64, "sys "), f"q{n}")) in addresses
    expected = "error" if failure == "nothing-listening" else "timeout"
    assert outcomes(app, expected) == 3 and outcomes(app, "ok") == 0
    assert tokenize_calls(pods) == 0  # the configured URL, not the pods, was asked
    await until_idle(app)
