"""KV events end to end: epp-sim pods publish over real ZMQ sockets on 127.0.0.1, epp's
subscriber indexes them, and the precise scorer routes on them (one or two epp replicas).

No sleeps: a test waits until each pod's publisher has seen the subscription
(``KVEventPublisher.subscribed``) before sending, and until the subscriber has applied as many
messages as the pod published (``KVEventSubscriber.received``), each bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from epp.datalayer import Datastore
from epp.datalayer.kvevents import KVEventIndex, KVEventSubscriber
from epp.domain import Endpoint, InferenceRequest, Pool
from epp.scheduling import Scheduler, build_scheduler
from epp.scheduling.blockkeys import BlockKeys
from epp.supervisor import Supervisor
from epp_sim.domain import EngineConfig
from epp_sim.profiles import FAST
from epp_sim.server import PodConfig, SimFleet, SimPod
from epp_sim.tokenizer import tokenize

from support.sim import text_of

MODEL = "/model/llama2"
DEADLINE = 10.0


@dataclass
class Replica:
    """One epp replica's data path: its own datastore, KV-event index, subscriber and scheduler."""

    store: Datastore
    index: KVEventIndex
    subscriber: KVEventSubscriber
    scheduler: Scheduler
    seen: dict[str, int]  # messages applied per pod before the current publisher started

    def endpoints(self) -> tuple[Endpoint, ...]:
        return self.store.endpoints()

    async def settle(self, pods: list[SimPod]) -> None:
        """Wait until every message the pods have published so far has been applied."""
        for pod in pods:
            assert pod.kv_events is not None
            want = self.seen.get(pod.address, 0) + pod.kv_events.seq
            await asyncio.wait_for(self.subscriber.received(pod.address, want), DEADLINE)

    def pick(self, prompt: str) -> str:
        r = InferenceRequest(request_id="q", model=MODEL, target_model=MODEL, prompt=prompt)
        return self.scheduler.schedule(r, self.endpoints())[0].address


def replica(fleet: SimFleet, supervisor: Supervisor, seed: int) -> Replica:
    endpoints = tuple(Endpoint(p.address, p.name) for p in fleet.pods)
    store = Datastore()
    store.set_pool(Pool("p", endpoints=endpoints))
    index = KVEventIndex(BlockKeys())
    zmq_of = {p.address: p.kv_events.endpoint for p in fleet.pods if p.kv_events is not None}
    subscriber = KVEventSubscriber(index, lambda e: zmq_of.get(e.address))
    # the wiring `epp serve` does: follow the pool, run under the supervisor
    store.on_change(lambda: subscriber.follow(store.all_endpoints()))
    subscriber.follow(store.all_endpoints())
    supervisor.spawn(f"kv-events-{seed}", subscriber.run)
    scheduler = build_scheduler("epp-precise", store, rng=random.Random(seed), kv_index=index)
    return Replica(store, index, subscriber, scheduler, {})


@pytest.fixture(params=["map", "array"])
async def fleet(request: pytest.FixtureRequest) -> AsyncIterator[SimFleet]:
    cfg = PodConfig(engine=EngineConfig(profile=FAST, num_gpu_blocks=4096), kv_events_endpoint="tcp://127.0.0.1:0",
                    kv_events_form=request.param)  # fmt: skip
    async with SimFleet(cfg, 3) as f:
        yield f


class Replicas:
    """Replicas made in a test, run under one supervisor; closed (tasks, then sockets) after it."""

    def __init__(self) -> None:
        self.supervisor = Supervisor()
        self.made: list[Replica] = []

    def __call__(self, fleet: SimFleet, seed: int) -> Replica:
        r = replica(fleet, self.supervisor, seed)
        self.made.append(r)
        return r


@pytest.fixture
async def replicas() -> AsyncIterator[Replicas]:
    rs = Replicas()
    yield rs
    await rs.supervisor.aclose()
    for r in rs.made:
        r.subscriber.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
        yield session


async def subscribed(pods: list[SimPod], n: int) -> None:
    for pod in pods:
        assert pod.kv_events is not None
        await asyncio.wait_for(pod.kv_events.subscribed(n), DEADLINE)


async def send(http: aiohttp.ClientSession, pod: SimPod, prompt: str) -> None:
    """A request straight to the pod (it bypasses every epp replica)."""
    async with http.post(pod.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}) as resp:
        assert resp.status == 200, await resp.text()


PROMPTS = [text_of(160, f"[application {i}] ") for i in range(3)]  # 10 blocks of 16 tokens each


async def test_precise_routing_follows_what_pods_report(fleet: SimFleet, replicas: Replicas, http) -> None:
    r = replicas(fleet, 1)
    await subscribed(fleet.pods, 1)
    for pod, prompt in zip(fleet.pods, PROMPTS, strict=True):
        await send(http, pod, prompt)
    await r.settle(fleet.pods)
    keys = BlockKeys()
    for pod, prompt in zip(fleet.pods, PROMPTS, strict=True):
        prompt_keys = keys.prompt_keys(prompt, MODEL, 16)
        assert len(prompt_keys) == 10
        assert [r.index.leading_run(p.address, prompt_keys) for p in fleet.pods] == [
            10 if p is pod else 0 for p in fleet.pods
        ]
        assert r.pick(prompt + " and a new question") == pod.address
    assert r.index.stats.gaps == 0 and r.index.stats.orphans == 0 and r.index.stats.decode_errors == 0


async def test_evictions_reach_the_index(replicas: Replicas, http) -> None:
    cfg = PodConfig(engine=EngineConfig(profile=FAST, num_gpu_blocks=40), kv_events_endpoint="tcp://127.0.0.1:0")
    async with SimFleet(cfg, 1) as fleet:
        r = replicas(fleet, 2)
        pod = fleet.pods[0]
        await subscribed(fleet.pods, 1)
        prompts = [text_of(200, f"[doc {i}] ") for i in range(6)]  # 12 blocks each, 39 usable: evictions
        for prompt in prompts:
            await send(http, pod, prompt)
        await r.settle(fleet.pods)
        assert r.index.stats.blocks_removed > 0
        assert r.index.num_blocks(pod.address) == pod.engine.kv.num_cached
        keys = BlockKeys()
        for prompt in prompts:
            truth = pod.engine.kv.match(tokenize(prompt, 16).block_hashes, 12)
            assert r.index.leading_run(pod.address, keys.prompt_keys(prompt, MODEL, 16)) == truth


async def test_sequence_gap_and_restart_rebuild_the_pod(fleet: SimFleet, replicas: Replicas, http) -> None:
    r = replicas(fleet, 3)
    pod = fleet.pods[0]
    assert pod.kv_events is not None
    await subscribed(fleet.pods, 1)
    await send(http, pod, PROMPTS[0])
    await r.settle([pod])
    keys = BlockKeys()
    assert r.index.leading_run(pod.address, keys.prompt_keys(PROMPTS[0], MODEL, 16)) == 10
    # five messages lost on the way: the next one reveals the gap
    pod.kv_events.seq += 5
    r.seen[pod.address] = -5
    await send(http, pod, PROMPTS[1])
    await r.settle([pod])
    assert r.index.stats.by_reason == {"gap": 1}
    assert r.index.leading_run(pod.address, keys.prompt_keys(PROMPTS[0], MODEL, 16)) == 0  # dropped, unknown now
    assert r.index.leading_run(pod.address, keys.prompt_keys(PROMPTS[1], MODEL, 16)) == 10  # rebuilt
    # a process restart: the connection drops, the new process numbers from 0 and holds nothing
    r.seen[pod.address] = r.index.messages(pod.address)
    await pod.restart()
    await subscribed([pod], 1)
    await send(http, pod, PROMPTS[2])
    await r.settle([pod])
    assert r.index.stats.resets >= 2 and r.index.stats.orphans == 0
    assert r.index.leading_run(pod.address, keys.prompt_keys(PROMPTS[1], MODEL, 16)) == 0
    assert r.index.leading_run(pod.address, keys.prompt_keys(PROMPTS[2], MODEL, 16)) == 10
    assert r.pick(PROMPTS[2]) == pod.address


async def test_a_pod_leaving_the_pool_is_forgotten(fleet: SimFleet, replicas: Replicas, http) -> None:
    r = replicas(fleet, 4)
    await subscribed(fleet.pods, 1)
    await send(http, fleet.pods[2], PROMPTS[2])
    await r.settle(fleet.pods)
    assert r.index.num_blocks(fleet.pods[2].address) == 10
    r.store.set_pool(Pool("p", endpoints=r.endpoints()[:2]))
    assert sorted(r.subscriber.addresses) == sorted(p.address for p in fleet.pods[:2])
    assert fleet.pods[2].address not in r.index.addresses() and len(r.index) == 0


async def test_two_replicas_make_the_same_prefix_decisions(fleet: SimFleet, replicas: Replicas, http) -> None:
    a, b = replicas(fleet, 5), replicas(fleet, 6)
    await subscribed(fleet.pods, 2)
    rng = random.Random(7)
    prompts = [text_of(96, f"[tenant {i}] ") for i in range(9)]
    home = {}
    for prompt in prompts:  # traffic neither replica routed (as if a third router, or the other replica, sent it)
        home[prompt] = rng.choice(fleet.pods)
        await send(http, home[prompt], prompt)
    await a.settle(fleet.pods)
    await b.settle(fleet.pods)
    picks_a = [a.pick(p + " follow-up") for p in prompts]
    picks_b = [b.pick(p + " follow-up") for p in prompts]
    assert picks_a == picks_b == [home[p].address for p in prompts]
    assert len(a.index) == len(b.index) > 0


async def test_epp_serve_wiring_subscribes_per_pod_and_routes_on_blocks_it_never_sent(write_pool, start_app):
    """``--kv-events-port``: the App subscribes to every pod (same port, the pod's own IP, as
    in a cluster) and epp-precise follows a prefix cached by traffic that bypassed epp."""
    import socket

    with socket.socket() as probe:  # a port free on 127.0.0.2; the pods bind it on their own IPs
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    pods = [
        SimPod(PodConfig(name=f"kv-{i}", engine=EngineConfig(profile=FAST, num_gpu_blocks=4096),
                         kv_events_endpoint=f"tcp://127.0.0.{i + 2}:{port}"))
        for i in range(2)
    ]
    for i, pod in enumerate(pods):
        await pod.start(host=f"127.0.0.{i + 2}")
    try:
        app = await start_app(write_pool([p.address for p in pods]), kv_events_port=port,
                              scheduling_profile="epp-precise", refresh_metrics_interval=0)
        for pod in pods:
            assert pod.kv_events is not None
            await asyncio.wait_for(pod.kv_events.subscribed(), DEADLINE)
        prompt = text_of(600, "shared system prompt")
        async with aiohttp.ClientSession() as http:  # straight to the second pod: epp never sees it
            body = {"model": MODEL, "prompt": prompt + " first question", "max_tokens": 2}
            async with http.post(pods[1].url + "/v1/completions", json=body) as r:
                assert r.status == 200
        assert pods[1].kv_events is not None and pods[1].kv_events.seq > 0
        await asyncio.wait_for(app.kv_subscriber.received(pods[1].address, pods[1].kv_events.seq), DEADLINE)
        request = InferenceRequest(request_id="r", model=MODEL, target_model=MODEL, prompt=prompt + " second")
        picks = {app.router.route(request).primary.address for _ in range(10)}
        assert picks == {pods[1].address}
    finally:
        for pod in pods:
            await pod.aclose()
