"""Integration tests of `epp-sim` pods over real loopback HTTP (port 0, no sleeps)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp_sim.domain import EngineConfig
from epp_sim.metrics import MetricsOverride
from epp_sim.profiles import FAST
from epp_sim.server import PodConfig, SimFleet, SimPod

MODEL = "/model/llama2"


def config(**engine: Any) -> PodConfig:
    return PodConfig(engine=EngineConfig(**{"profile": FAST, "num_gpu_blocks": 4096, **engine}))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture
async def pod() -> AsyncIterator[SimPod]:
    async with SimFleet(config(), 1) as fleet:
        yield fleet.pods[0]


async def post(http: aiohttp.ClientSession, pod: SimPod, path: str, body: Any) -> tuple[int, Any, str]:
    async with http.post(pod.url + path, json=body) as resp:
        raw = await resp.read()
        ctype = resp.headers.get("Content-Type", "")
        data = orjson.loads(raw) if ctype.startswith("application/json") else raw.decode()
        return resp.status, data, resp.headers.get("x-sim-pod", "")


async def stream(http: aiohttp.ClientSession, pod: SimPod, path: str, body: Any) -> tuple[list[Any], float]:
    """SSE events (decoded JSON, or the string "[DONE]") and the time to the first event."""
    events: list[Any] = []
    t0 = time.perf_counter()
    first = 0.0
    async with http.post(pod.url + path, json={**body, "stream": True}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["x-sim-pod"] == pod.name
        async for line in resp.content:
            if not line.strip():
                continue
            if not first:
                first = time.perf_counter() - t0
            payload = line.decode().removeprefix("data: ").strip()
            events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events, first


async def scrape(http: aiohttp.ClientSession, pod: SimPod, names: list[str] | None = None) -> dict[str, float]:
    params = [("name[]", n) for n in names or []]
    async with http.get(pod.url + "/metrics", params=params) as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def test_completion_echoes_model_and_reports_usage(http: aiohttp.ClientSession, pod: SimPod) -> None:
    status, data, tag = await post(
        http, pod, "/v1/completions", {"model": "sql-lora", "prompt": "hello " * 40, "max_tokens": 7}
    )
    assert status == 200 and tag == "pod-0"
    assert data["object"] == "text_completion" and data["model"] == "sql-lora"
    assert data["choices"][0]["finish_reason"] == "length" and data["choices"][0]["text"]
    assert data["usage"] == {
        "prompt_tokens": 60,
        "completion_tokens": 7,
        "total_tokens": 67,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert pod.requests_received == 1


async def test_batch_prompts_and_token_ids(http: aiohttp.ClientSession, pod: SimPod) -> None:
    status, data, _ = await post(
        http, pod, "/v1/completions", {"model": MODEL, "prompt": ["a b c", "d e f"], "max_tokens": 3}
    )
    assert status == 200 and [c["index"] for c in data["choices"]] == [0, 1]
    assert data["usage"]["completion_tokens"] == 6
    status, data, _ = await post(http, pod, "/v1/completions", {"prompt": [1, 2, 3, 4], "max_tokens": 2})
    assert status == 200 and data["usage"]["prompt_tokens"] == 4 and data["model"] == MODEL


async def test_chat_sse_with_usage(http: aiohttp.ClientSession, pod: SimPod) -> None:
    body = {
        "model": "tweet-summary-2",
        "messages": [{"role": "user", "content": "summarise " * 30}],
        "max_completion_tokens": 5,
        "stream_options": {"include_usage": True},
    }
    events, _ = await stream(http, pod, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tweet-summary-2" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]][1:]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_completion_stream_without_usage(http: aiohttp.ClientSession, pod: SimPod) -> None:
    events, _ = await stream(http, pod, "/v1/completions", {"prompt": "x" * 100, "max_tokens": 4})
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]).count(" ") == 4


@pytest.mark.parametrize(
    ("path", "body", "status", "kind"),
    [
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "NotFoundError"),
        ("/v1/completions", {"prompt": ""}, 400, "BadRequestError"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "BadRequestError"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 9000}, 400, "BadRequestError"),
        ("/v1/chat/completions", {"messages": []}, 400, "BadRequestError"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user"}], "stream_options": {"include_usage": True}},
            400,
            "BadRequestError",
        ),
    ],
    ids=["unknown-model", "empty-prompt", "zero-max-tokens", "too-long", "no-messages", "options-without-stream"],
)
async def test_errors_have_vllm_shape(
    http: aiohttp.ClientSession, pod: SimPod, path: str, body: Any, status: int, kind: str
) -> None:
    got, data, tag = await post(http, pod, path, body)
    assert got == status and tag == "pod-0"
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["type"] == kind and data["error"]["code"] == status


async def test_tokenize_gives_the_ids_the_kv_events_carry(http: aiohttp.ClientSession, pod: SimPod) -> None:
    """vLLM's ``POST /tokenize``: a prompt's ids are its bytes in fours (the last zero-padded), a
    chat's those of its rendering through the chat template, the generation prompt included
    unless ``add_generation_prompt`` is false."""
    status, data, _ = await post(http, pod, "/tokenize", {"model": MODEL, "prompt": "abcdefg"})
    assert status == 200
    assert data == {"count": 2, "max_model_len": pod.config.engine.max_model_len,
                    "tokens": [int.from_bytes(b"abcd", "little"), int.from_bytes(b"efg\0", "little")],
                    "token_strs": None}  # fmt: skip
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = "<|system|>\nbe brief\n<|user|>\nhi\n"
    for extra, text in (({}, rendered + "<|assistant|>\n"), ({"add_generation_prompt": False}, rendered)):
        status, data, _ = await post(http, pod, "/tokenize", {"messages": messages, **extra})
        padded = text.encode() + b"\0" * (-len(text.encode()) % 4)
        assert status == 200 and data["tokens"] == [int.from_bytes(padded[i : i + 4], "little")
                                                    for i in range(0, len(padded), 4)]  # fmt: skip
    assert pod.tokenize_received == 3


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400),
        ({"model": MODEL}, 400),
        ({"prompt": ["x"]}, 400),
        ({"messages": [{"content": "x"}]}, 400),
        ({"model": "nope", "prompt": "x"}, 404),
        (["x"], 400),
    ],
    ids=["both", "neither", "prompt-list", "message-without-role", "unknown-model", "not-an-object"],
)
async def test_tokenize_errors_have_vllm_shape(http: aiohttp.ClientSession, pod: SimPod, body: Any, status: int):
    got, data, _ = await post(http, pod, "/tokenize", body)
    assert got == status and data["error"]["code"] == status


async def test_invalid_json(http: aiohttp.ClientSession, pod: SimPod) -> None:
    async with http.post(pod.url + "/v1/completions", data=b"{not json") as resp:
        assert resp.status == 400 and (await resp.json())["error"]["type"] == "BadRequestError"


async def test_models_health_and_lora_lifecycle(http: aiohttp.ClientSession, pod: SimPod) -> None:
    async with http.get(pod.url + "/health") as resp:
        assert resp.status == 200 and await resp.read() == b""
    async with http.get(pod.url + "/v1/models") as resp:
        models = {m["id"]: m for m in (await resp.json())["data"]}
    assert models[MODEL]["parent"] is None
    assert models["sql-lora-1"]["parent"] == MODEL
    assert models["sql-lora-1"]["root"] == "/adapters/yard1/llama-2-7b-sql-lora-test_1"
    assert {f"tweet-summary-{i}" for i in range(1, 5)} <= set(models)

    new = {"lora_name": "my-lora", "lora_path": "/adapters/mine"}
    status, text, _ = await post(http, pod, "/v1/load_lora_adapter", new)
    assert status == 200 and text == "Success: LoRA adapter 'my-lora' added successfully."
    assert (await post(http, pod, "/v1/load_lora_adapter", new))[0] == 400
    assert (await post(http, pod, "/v1/load_lora_adapter", {"lora_name": "x"}))[0] == 400
    status, data, _ = await post(http, pod, "/v1/completions", {"model": "my-lora", "prompt": "hi", "max_tokens": 1})
    assert status == 200 and data["model"] == "my-lora"
    status, text, _ = await post(http, pod, "/v1/unload_lora_adapter", {"lora_name": "my-lora"})
    assert status == 200 and text == "Success: LoRA adapter 'my-lora' removed successfully."
    status, data, _ = await post(http, pod, "/v1/unload_lora_adapter", {"lora_name": "my-lora"})
    assert status == 404 and data["error"]["type"] == "NotFoundError"
    assert (await post(http, pod, "/v1/completions", {"model": "my-lora", "prompt": "hi"}))[0] == 404


async def test_prefix_hit_cuts_ttft(http: aiohttp.ClientSession, pod: SimPod) -> None:
    body = {"prompt": "The quick brown fox jumps over the lazy dog. " * 700, "max_tokens": 2}  # ~7.9k tokens
    cold, ttft_cold = await stream(http, pod, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    warm, ttft_warm = await stream(http, pod, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert cold[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert warm[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] > 7000
    assert ttft_warm < 0.5 * ttft_cold
    m = await scrape(http, pod, ["vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"])
    assert m["vllm:prefix_cache_hits_total"] > 7000
    assert m["vllm:prefix_cache_queries_total"] > 2 * m["vllm:prefix_cache_hits_total"] * 0.99


async def test_preemption_under_kv_pressure(http: aiohttp.ClientSession) -> None:
    async with SimFleet(config(num_gpu_blocks=41), 1) as fleet:  # 640 tokens of KV
        pod = fleet.pods[0]
        bodies = [{"prompt": f"{i} " + "w" * 400, "max_tokens": 150} for i in range(4)]
        results = await asyncio.gather(*(post(http, pod, "/v1/completions", b) for b in bodies))
        assert all(status == 200 and data["usage"]["completion_tokens"] == 150 for status, data, _ in results)
        m = await scrape(http, pod)
        assert m["vllm:num_preemptions_total"] > 0
        assert m["vllm:kv_cache_usage_perc"] == 0.0
        assert m["vllm:request_success_total"] == 4


async def test_metrics_families_and_name_filter(http: aiohttp.ClientSession, pod: SimPod) -> None:
    await post(http, pod, "/v1/completions", {"model": "sql-lora", "prompt": "q " * 50, "max_tokens": 3})
    m = await scrape(http, pod)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_sum",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    ):
        assert name in m, name
    wanted = ["vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"]
    assert set(await scrape(http, pod, wanted)) == set(wanted)
    async with http.get(pod.url + "/metrics", params=[("name[]", "vllm:num_requests_running")]) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"  # aiohttp asked for it and decoded it
        assert (await resp.text()).count("\nvllm:") == 1


async def test_pause_exposes_queue_and_hooks(http: aiohttp.ClientSession, pod: SimPod) -> None:
    pod.pause()
    tasks = [
        asyncio.create_task(post(http, pod, "/v1/completions", {"prompt": f"{i}", "max_tokens": 2})) for i in range(3)
    ]
    await pod.requests_seen(3)
    m = await scrape(http, pod, ["vllm:num_requests_waiting", "vllm:num_requests_running"])
    assert m == {"vllm:num_requests_waiting": 3.0, "vllm:num_requests_running": 0.0}
    pod.resume()
    assert [r[0] for r in await asyncio.gather(*tasks)] == [200, 200, 200]
    await pod.idle()
    pod.set_metrics(MetricsOverride(waiting=42))
    m = await scrape(http, pod, ["vllm:num_requests_waiting"])
    assert m["vllm:num_requests_waiting"] == 42.0


async def test_client_disconnect_aborts(http: aiohttp.ClientSession, pod: SimPod) -> None:
    async with http.post(pod.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5000, "stream": True}) as resp:
        await resp.content.readline()  # first token arrived: the request is running
    await pod.idle()
    m = await scrape(http, pod, ["vllm:request_success_total"])
    assert m["vllm:request_success_total"] == 1.0  # the abort


async def test_fleet_of_pods_on_distinct_ports(http: aiohttp.ClientSession) -> None:
    async with SimFleet(config(), 3, name_prefix="sim") as fleet:
        assert len(set(fleet.addresses)) == 3
        for pod in fleet.pods:
            _, _, tag = await post(http, pod, "/v1/completions", {"prompt": "hi", "max_tokens": 1})
            assert tag == pod.name
        assert [p.name for p in fleet.pods] == ["sim-0", "sim-1", "sim-2"]
