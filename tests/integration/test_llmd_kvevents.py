"""epp consuming the KV events of llm-d-inference-sim, a simulator we did not write.

The simulator (v0.10.2, ``--enable-kvcache --zmq-endpoint``) *connects* a ZMQ PUB socket to
the endpoint it is given and publishes on ``kv@<POD_IP>@<model>``; epp's bind-mode collector
(``epp.datalayer.kvcollect``) binds that endpoint and feeds its ``KVEventIndex``.  With the
simulator's dummy tokenizer reproduced by ``LlmdSimTokenizer``, the blocks epp keys from a
``/v1/completions`` prompt are exactly the blocks the events report, and the simulator's own
``cached_tokens`` agrees with what epp's index predicted before the request was sent.

No sleeps: a test waits until the simulator's publisher has connected (``connected``) and
then until the collector has applied each message (``received``), bounded by deadlines.  The
one retry is the warm-up: a ZMQ PUB drops what it publishes before it has read the
subscriber's subscription, and nothing outside the simulator can observe that moment, so
warm-up requests (each with a new block) are sent until one of them arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from epp.datalayer.kvcollect import KVEventCollector
from epp.datalayer.kvevents import KVEventIndex
from epp.datalayer.tokenize import TokenizeClient
from epp.domain import Endpoint
from epp.openai import parse_inference_request
from epp.scheduling.blockkeys import BlockKeys
from epp.scheduling.tokenizers import LlmdSimTokenizer, ServerTokenizer

from support import llmd_sim
from support.kvevents import running_collectors

MODEL = "/model/llama2"
BS = 16
DEADLINE = 10.0
SIM_ARGS = [
    "--model", MODEL,
    "--enable-kvcache",
    "--kv-cache-size", "1024",  # no evictions in these tests
    "--block-size", str(BS),
    "--force-dummy-tokenizer",  # otherwise it asks huggingface.co which tokenizer to use
    "--event-batch-size", "1",  # publish each event at once (else up to 16 wait for a 1 s timer)
    "--seed", "7",
]  # fmt: skip

TOKENIZER = LlmdSimTokenizer()
KEYS = BlockKeys(TOKENIZER)


def words(n: int, tag: str) -> str:
    """A prompt of exactly ``n`` dummy-tokenizer tokens (a word and its trailing space each)."""
    return " ".join(f"{tag}{i}" for i in range(n)) + " "


@pytest.fixture(scope="session")
def sim_binary() -> Path:
    return llmd_sim.binary_or_skip()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
        yield session


Collect = Callable[..., KVEventCollector]


@pytest.fixture
async def collect() -> AsyncIterator[Collect]:
    """Bound, running collectors (port 0 on 127.0.0.1); cancelled and closed after the test."""
    async with running_collectors() as run:
        yield lambda **kw: run(KVEventCollector(KVEventIndex(BlockKeys()), "tcp://127.0.0.1:0", **kw))


@pytest.fixture
async def sims(sim_binary: Path, tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[Callable[..., Any]]:
    """Start simulators publishing to a collector; all stopped after the test."""
    started: list[llmd_sim.LlmdSim] = []

    async def start(c: KVEventCollector, *extra: str, name: str = "sim", pod_ip: str = "127.0.0.1") -> llmd_sim.LlmdSim:
        sim = llmd_sim.LlmdSim(sim_binary, [*SIM_ARGS, "--zmq-endpoint", c.endpoint, *extra], name=name,
                               log_dir=tmp_path, env={"POD_IP": pod_ip})  # fmt: skip
        started.append(sim)
        return await sim.start(http)

    yield start
    for sim in started:
        await sim.stop()


async def complete(http: aiohttp.ClientSession, sim: llmd_sim.LlmdSim, prompt: str) -> dict[str, Any]:
    """A /v1/completions request straight to the simulator; its usage."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    async with http.post(sim.url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        usage: dict[str, Any] = (await r.json())["usage"]
        return usage


async def warm_up(http: aiohttp.ClientSession, c: KVEventCollector, sim: llmd_sim.LlmdSim, publishers: int = 1) -> int:
    """Wait until the simulator's publisher delivers (module docstring); the messages applied so far."""
    async with asyncio.timeout(DEADLINE):
        await c.connected(publishers)
    for attempt in range(5):
        await complete(http, sim, words(BS, f"warm{attempt}x"))
        try:
            async with asyncio.timeout(1.0):
                await c.received(sim.address, 1)
            return c.index.messages(sim.address)
        except TimeoutError:
            continue
    raise AssertionError(f"no KV event from {sim.name} after 5 warm-up requests:\n{sim.log_tail()}")


Chatted = tuple[KVEventCollector, llmd_sim.LlmdSim, int, dict[str, Any], dict[str, Any]]


async def chat_to_one_sim(collect: Collect, sims: Any, http: aiohttp.ClientSession) -> Chatted:
    """A simulator publishing to a collector, warmed up, then one chat (80 tokens once rendered)
    sent straight to it: the collector, the simulator, the messages applied before the chat, the
    chat's body and its usage."""
    c = collect()
    sim = await sims(c, "--use-vllm-map-event-format")
    c.follow([Endpoint(sim.address, sim.name)])
    seen = await warm_up(http, c, sim)
    messages = [{"role": "system", "content": words(40, "rule")}, {"role": "user", "content": words(30, "ask")}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 2}
    async with http.post(sim.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        usage: dict[str, Any] = (await r.json())["usage"]
    return c, sim, seen, body, usage


async def test_completions_blocks_match_what_epp_computes(collect: Collect, sims, http) -> None:
    c = collect()
    sim = await sims(c, "--use-vllm-map-event-format")
    c.follow([Endpoint(sim.address, sim.name)])  # topic kv@127.0.0.1@<model>: the one pod with that ip
    seen = await warm_up(http, c, sim)
    index = c.index

    base = words(170, "doc") + "and, (some) punctuation: x_y; end."  # 10 full blocks and a partial one
    n_base = len(TOKENIZER.token_ids(base))
    usage = await complete(http, sim, base)
    assert usage["prompt_tokens"] == n_base  # the simulator tokenized it as epp does
    async with asyncio.timeout(DEADLINE):
        await c.received(sim.address, seen + 1)
    base_keys = KEYS.prompt_keys(base, MODEL, BS)
    assert len(base_keys) == n_base // BS == 11
    assert index.block_size(sim.address) == BS
    assert index.leading_run(sim.address, base_keys) == len(base_keys)
    assert index.leading_run(sim.address, KEYS.prompt_keys(words(64, "other"), MODEL, BS)) == 0

    # A prompt extending it: the event carries only the new blocks, parented on the last cached
    # one; epp predicts the simulator's prefix hit before sending, and the simulator agrees.
    longer = base + " " + words(40, "more")
    longer_keys = KEYS.prompt_keys(longer, MODEL, BS)
    hit = index.leading_run(sim.address, longer_keys)
    assert 0 < hit < len(longer_keys)
    usage = await complete(http, sim, longer)
    assert usage["prompt_tokens_details"]["cached_tokens"] == hit * BS
    async with asyncio.timeout(DEADLINE):
        await c.received(sim.address, seen + 2)
    assert index.leading_run(sim.address, longer_keys) == len(longer_keys)
    assert index.num_blocks(sim.address) == seen + len(longer_keys)  # and one block per warm-up message
    stats = index.stats
    assert (stats.orphans, stats.gaps, stats.decode_errors, stats.skipped) == (0, 0, 0, 0), stats
    assert c.stats.unknown == 0 and c.stats.bad_topic == 0


async def test_chat_keys_follow_the_simulators_chat_template(collect: Collect, sims, http) -> None:
    """The simulator tokenizes a chat as ``### <role>: <content>\\n`` per message; epp's own
    ``InferenceRequest.prompt`` is ``<role>:<content>\\n`` (its keys miss the blocks), but the
    llmd-sim tokenizer renders the request's messages with the simulator's template, so the keys
    the precise scorer uses (``request_text``) hit every block."""
    c, sim, seen, body, usage = await chat_to_one_sim(collect, sims, http)
    messages = body["messages"]
    async with asyncio.timeout(DEADLINE):
        await c.received(sim.address, seen + 1)
    sim_text = "".join(f"### {m['role']}: {m['content']}\n" for m in messages)
    assert usage["prompt_tokens"] == len(TOKENIZER.token_ids(sim_text))
    sim_keys = KEYS.prompt_keys(sim_text, MODEL, BS)
    assert len(sim_keys) == 5 and c.index.leading_run(sim.address, sim_keys) == 5  # 80 tokens
    epp_prompt = parse_inference_request(orjson.dumps(body), {}, path="/v1/chat/completions")[0].prompt
    assert epp_prompt == "".join(f"{m['role']}:{m['content']}\n" for m in messages)
    assert c.index.leading_run(sim.address, KEYS.prompt_keys(epp_prompt, MODEL, BS)) == 0
    request = parse_inference_request(orjson.dumps(body), {}, path="/v1/chat/completions")[0]
    text = KEYS.request_text(request.prompt, request.messages)
    assert text == sim_text and c.index.leading_run(sim.address, KEYS.prompt_keys(text, MODEL, BS)) == 5


async def test_array_form_parent_zero_means_no_parent(collect: Collect, sims, http) -> None:
    """Without ``--use-vllm-map-event-format`` the simulator sends ``parent_block_hash`` 0 for
    "no parent" (llm-d's EmptyBlockHash), where vLLM sends nil: epp reads 0 as no parent, so the
    array form indexes the prompt's blocks as the map form does (nothing is an orphan)."""
    c = collect()
    sim = await sims(c)
    c.follow([Endpoint(sim.address, sim.name)])
    seen = await warm_up(http, c, sim)
    prompt = words(80, "arr")
    await complete(http, sim, prompt)
    async with asyncio.timeout(DEADLINE):
        await c.received(sim.address, seen + 1)
    stats = c.index.stats
    assert stats.events == seen + 1 and stats.decode_errors == 0 and stats.orphans == 0
    assert c.index.leading_run(sim.address, KEYS.prompt_keys(prompt, MODEL, BS)) == 5
    assert c.index.leading_run(sim.address, KEYS.prompt_keys(words(80, "other"), MODEL, BS)) == 0


async def test_two_simulators_share_one_collector(collect: Collect, sims, http) -> None:
    """Two pods on one IP need distinct topics: ``POD_IP`` only names the topic, so each gets a name."""
    names: dict[str, str] = {}
    c = collect(address_of_topic=names.get)
    pods = [await sims(c, "--use-vllm-map-event-format", name=f"sim-{i}", pod_ip=f"sim-{i}") for i in range(2)]
    names.update({p.name: p.address for p in pods})
    seen = {p.address: await warm_up(http, c, p, publishers=2) for p in pods}
    prompts = [words(48, f"tenant{i}x") for i in range(2)]  # 3 blocks each
    for p, prompt in zip(pods, prompts, strict=True):
        await complete(http, p, prompt)
    async with asyncio.timeout(DEADLINE):
        for p in pods:
            await c.received(p.address, seen[p.address] + 1)
    assert [[c.index.leading_run(p.address, KEYS.prompt_keys(q, MODEL, BS)) for q in prompts] for p in pods] == [
        [3, 0], [0, 3]]  # fmt: skip
    assert c.index.stats.gaps == 0 and c.stats.unknown == 0


async def test_its_own_tokenize_endpoint_gives_the_keys_its_events_report(collect: Collect, sims, http) -> None:
    """``tokenizer: vllm-tokenize`` against a server we did not write: the ids the simulator's
    ``POST /tokenize`` returns for a completion and for a chat (rendered by its own template)
    are the ones its KV events carry, and the ones ``LlmdSimTokenizer`` reproduces."""
    c, sim, seen, body, _ = await chat_to_one_sim(collect, sims, http)
    prompt = words(64, "plain")
    await complete(http, sim, prompt)
    async with asyncio.timeout(DEADLINE):
        await c.received(sim.address, seen + 2)
    server = ServerTokenizer(url=sim.url, timeout=DEADLINE)
    keys = BlockKeys(server)
    client = TokenizeClient(lambda model: None)
    try:
        chat = parse_inference_request(orjson.dumps(body), {}, path="/v1/chat/completions", prompt_source=True)[0]
        completion = parse_inference_request(orjson.dumps({"model": MODEL, "prompt": prompt}), {},
                                             path="/v1/completions", prompt_source=True)[0]  # fmt: skip
        for request, blocks in ((chat, 5), (completion, 4)):
            need = server.need(request)
            assert need is not None
            await client(need)
            ids = server.ids_for(request)
            assert ids is not None
            assert list(ids) == list(TOKENIZER.token_ids(KEYS.request_text(request.prompt, request.messages)))
            assert c.index.leading_run(sim.address, keys.id_keys(ids, MODEL, BS)) == blocks
    finally:
        await client.aclose()
