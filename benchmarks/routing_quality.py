"""Routing quality: epp's scheduling policies against baselines and an oracle on a simulated fleet.

Replays one seeded trace per load level (see `_workload.py`: 8 h100-8b pods with four LoRA
slots, groups of requests sharing 2-6k-token system prompts, half the requests on one of the
ten reference adapters, Poisson arrivals, 200-1000 output tokens) through epp-sim's
`VirtualFleet` in virtual time, once per policy:

- `random`, `round-robin`, `least-inflight`, `gie-default`, `epp-default`: epp's own
  schedulers, `epp.scheduling.build_scheduler(name, datastore, rng=)`. The
  `Datastore` is fed what a real epp would see: each pod's gauges as of its last scrape
  (`--scrape-interval`, 50 ms like epp's `--refresh-metrics-interval`), plus epp's own
  in-flight tickets (its load ledger), acquired when a request is sent and released when
  it finishes. The datastore's clock is the virtual clock, so metric ages are virtual too.
  One scheduler per (policy, load) run, so state it learns (e.g. a prefix index) never
  leaks between runs.
- `oracle`: reads the true engines at the instant of arrival and picks the pod with the
  lowest estimated TTFT (see `OracleRouter`). It knows everything about the present
  (queues, cache contents, KV blocks, LoRA batches) and nothing about the future.

Load is the arrival rate as a fraction of the fleet's capacity, which is measured, not
assumed: the saturation throughput of the fleet on this workload (`_workload.calibrate_capacity`).

Each trace is `--duration` seconds of arrivals (the same requests at every load, compressed
in time). Reported per (policy, load), over requests that arrive after the first `--warmup`
seconds (40 s of virtual time by default: caches start cold, and the running batch fills up
slowly, since a longer batch means a slower step and so still more requests running; at
0.85 load the token rate takes 40-50 s to settle): TTFT p50/p90/p99; ITL p50/p90 (of each
request's mean inter-token latency, as epp-sim reports it); prefix-cache hit rate (cached /
prompt tokens). Output tokens/s is measured over the window from the warm-up cutoff to the
last arrival (each request's tokens counted as spread evenly between its first and last
token): in a steady state it equals the offered load, and a policy that falls behind
delivers less. The drain after the last arrival is left out of the rate; `drain_s` (last
finish - last arrival) shows the backlog instead.
Over the whole run: LoRA swaps (adapter loads into a GPU slot, cold loads included),
preemptions, rejected (requests the scheduler refused, e.g. `Shed` = 429).

Percentiles are `_stats.percentile` (linear interpolation between closest ranks).

Adversarial workloads (`--workloads`, default `base` = the above): where an approximate
prefix index (what epp itself sent where) goes wrong. Each replays one seeded trace per load
under `epp-approx` (epp-default's approximate index) and `epp-precise` (the precise prefix
scorer on the pods' KV-cache events: every pod publishes vLLM events in virtual time, each
epp replica's `KVEventIndex` applies them, `--kv-event-lag` after the step that produced
them):

- `evict`: memory pressure: `EVICT_GROUPS` applications on pods with `EVICT_BLOCKS` KV blocks,
  so cached system prompts are evicted all the time;
- `bypass`: 20 % of the requests go to a uniformly random pod without passing through epp;
- `restart`: every `RESTART_EVERY` s the next pod restarts (empty cache, its running
  requests start over, its events number from 0 again);
- `replicas`: two epp replicas share the fleet, each request to one of them at random; each
  has its own datastore (fed the same scrapes), in-flight tickets, approximate index and, for
  epp-precise, KV-event index; they are active-active peers (`epp.datalayer.peers`): each
  replica's load and speculative entries reach the other `--peer-lag` later (5 ms; epp sends
  every 5 ms; `--no-peer-sync` turns it off);
- `evict-2r`: evict's memory pressure with two replicas (where per-replica approximate indexes
  cost: each replica places an application on its own pod, so the fleet holds it twice);
- `adversarial`: evict + bypass + restart at once; `adversarial-2r`: the same with two replicas;
- `many-apps`: evict's trace without the memory pressure.

Each adversarial check also shows its *floor*: the same trace without the adversity (one
replica, all memory, nothing bypassed or restarted: `base`, or `many-apps` for evict) under
epp-precise, over epp-approx's p90: the lowest ratio any policy could reach if the adversity
cost nothing. `--seeds 0,1,2` runs every row once per seed and reports medians (table, checks,
and rows with `"seed": "median"`): near saturation one seed's p90 swings by 10x.

Load is a fraction of the base workload's capacity on every workload, so each replays the
base trace's arrival rate (`evict`'s trace has more applications, the rest the same
requests). Rows carry `workload`, `replicas`, `bypass_share`, `restarts`, and for epp-precise
the subscriber's cost (`kv_us_per_event`: decode + apply, CPU µs per event, summed over
replicas) and counters (`kv_events`, `kv_resets`, `kv_orphans`, `kv_index_blocks`).

    python benchmarks/routing_quality.py --quick          # 3 loads, 100 s traces: ~2.5 min on 2 cores
    python benchmarks/routing_quality.py --quick --json   # JSON lines on stdout, table on stderr
    python benchmarks/routing_quality.py                  # 6 loads up to 0.9, 200 s traces: ~10 min
    python benchmarks/routing_quality.py --quick --out benchmarks/results/routing_quality_quick
    python benchmarks/routing_quality.py --quick --loads 0.7,0.85 --seeds 0,1,2 --policies epp-approx,epp-precise \
        --workloads base,many-apps,evict,bypass,restart,replicas,adversarial,adversarial-2r

Writes nothing to disk unless `--out PREFIX` is given; then PREFIX.json (run parameters,
rows, checks), PREFIX.jsonl (the rows, as `--json` prints them) and PREFIX.png (the plot,
if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from _cli import ArgumentParser, Output, float_list, json_line, non_negative_float, positive_float, positive_int
from _stats import percentile
from _workload import (
    BASE_MODEL,
    PODS,
    Workload,
    calibrate_capacity,
    fleet_configs,
    make_trace,
)
from epp.datalayer import Datastore, InflightTicket
from epp.datalayer.kvevents import KVEventIndex
from epp.datalayer.peers import PeerSync
from epp.domain import Endpoint, EndpointMetrics, InferenceRequest, Pool, estimate_tokens
from epp.errors import Rejected
from epp.scheduling import build_scheduler
from epp.scheduling.blockkeys import BlockKeys
from epp_sim import (
    Engine,
    EngineConfig,
    PodSnapshot,
    Prompt,
    RequestResult,
    SimRequest,
    TraceRequest,
    VirtualFleet,
    tokenize,
)

EPP_POLICIES = ("random", "round-robin", "least-inflight", "gie-default", "epp-default")
EVENT_POLICIES = ("epp-approx", "epp-precise")  # the approximate index vs the pods' KV events
POLICIES = (*EPP_POLICIES, "oracle", *EVENT_POLICIES)
BASE_POLICIES = (*EPP_POLICIES, "oracle")  # the default set on the base workload
PROFILE_OF = {"epp-approx": "epp-default"}  # policy name -> built-in profile, where they differ

EVICT_GROUPS = 96  # applications in the memory-pressure workloads (base: 32)
EVICT_BLOCKS = 12_000  # KV blocks per pod there (base: 27,793)
RESTART_EVERY = 8.0  # seconds between pod restarts (round robin over the pods)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One workload: what goes wrong for an approximate index."""

    groups: int = 32
    num_gpu_blocks: int = 27_793
    bypass_share: float = 0.0
    restart_every: float = 0.0
    replicas: int = 1

    def workload(self, seed: int) -> Workload:
        return Workload(groups=self.groups, seed=seed)

    def configs(self) -> list[EngineConfig]:
        return [dataclasses.replace(c, num_gpu_blocks=self.num_gpu_blocks) for c in fleet_configs(PODS)]

    def faults(self, start: float, end: float) -> list[tuple[float, int, str]]:
        if self.restart_every <= 0:
            return []
        n = int((end - start) / self.restart_every)
        return [(start + (k + 1) * self.restart_every, k % PODS, "restart") for k in range(n)]


SCENARIOS: dict[str, Scenario] = {
    "base": Scenario(),
    "evict": Scenario(groups=EVICT_GROUPS, num_gpu_blocks=EVICT_BLOCKS),
    "many-apps": Scenario(groups=EVICT_GROUPS),  # evict's trace without the memory pressure (its floor)
    "bypass": Scenario(bypass_share=0.2),
    "restart": Scenario(restart_every=RESTART_EVERY),
    "replicas": Scenario(replicas=2),
    "evict-2r": Scenario(groups=EVICT_GROUPS, num_gpu_blocks=EVICT_BLOCKS, replicas=2),
    "adversarial": Scenario(groups=EVICT_GROUPS, num_gpu_blocks=EVICT_BLOCKS, bypass_share=0.2,
                            restart_every=RESTART_EVERY),
    "adversarial-2r": Scenario(groups=EVICT_GROUPS, num_gpu_blocks=EVICT_BLOCKS, bypass_share=0.2,
                               restart_every=RESTART_EVERY, replicas=2),
}  # fmt: skip


class _Drained(Exception):
    """Every request finished or was rejected (VirtualFleet alone would keep scraping)."""


class Run:
    """Bookkeeping shared by every policy: results, rejections, and the end of the run.

    `VirtualFleet` has no way to refuse a request: the router must name a pod, and the fleet
    runs until every request has finished. So a rejected request is routed to pod 0, dropped
    by a gate on the engines' `add_request`, and the run ends (via `_Drained`) once
    finished + rejected covers the trace.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.results: list[RequestResult] = []
        self.rejected: Counter[str] = Counter()
        self._dropped: set[str] = set()

    def gate(self, engines: Sequence[Engine]) -> None:
        for engine in engines:
            add = engine.add_request

            def add_request(req: SimRequest, add: Callable[[SimRequest], None] = add) -> None:
                if req.request_id not in self._dropped:
                    add(req)

            engine.add_request = add_request  # type: ignore[method-assign]

    def reject(self, request_id: str, reason: str) -> int:
        self._dropped.add(request_id)
        self.rejected[reason] += 1
        self._check_drained()
        return 0

    def finished(self, result: RequestResult) -> None:
        self.results.append(result)
        self._check_drained()

    def _check_drained(self) -> None:
        if self._dropped and len(self.results) + len(self._dropped) == self.total:
            raise _Drained


class EppRouter:
    """An epp scheduler behind VirtualFleet's router callback.

    Scraped `PodSnapshot`s become `EndpointMetrics` in a `Datastore` (only when a pod was
    re-scraped, as the real scraper swaps metrics in); every routed request holds an
    in-flight ticket until it finishes.
    """

    def __init__(self, policy: str, run: Run, pods: int, seed: int, *, kv_events: bool = False,
                 peers: bool = False) -> None:  # fmt: skip
        self.now = 0.0
        self.run = run
        self.store = Datastore(clock=self.clock)
        self.endpoints = tuple(Endpoint(f"10.0.0.{i + 1}:8000", f"pod-{i}") for i in range(pods))
        self.store.set_pool(Pool("routing-quality", endpoints=self.endpoints))
        self.index = {e.address: i for i, e in enumerate(self.endpoints)}
        # The KV-event index of this replica, bounded by each pod's cache_config_info (num_gpu_blocks).
        self.kv_index = (
            KVEventIndex(BlockKeys(), capacity_of=lambda a: (m.num_blocks if (m := self.store.metrics(a)) else None),
                         now=self.clock)
            if kv_events
            else None
        )
        # Active-active: what this replica tells the others (its load, its speculative entries).
        self.peer_sync = (
            PeerSync(self.store.load, self.kv_index, replica_id=f"replica-{seed}", now=self.clock) if peers else None
        )
        profile = PROFILE_OF.get(policy, policy)
        self.scheduler = build_scheduler(profile, self.store, rng=random.Random(seed), kv_index=self.kv_index,
                                         peers=self.peer_sync.load if self.peer_sync else None)  # fmt: skip
        self._scraped_at = [math.nan] * pods
        self._tickets: dict[str, InflightTicket] = {}

    def clock(self) -> float:
        return self.now

    def _sync(self, pods: Sequence[PodSnapshot]) -> None:
        for p in pods:
            if p.updated_at == self._scraped_at[p.index]:
                continue
            self._scraped_at[p.index] = p.updated_at
            self.store.set_metrics(
                self.endpoints[p.index].address,
                EndpointMetrics(
                    waiting=p.waiting,
                    running=p.running,
                    kv_usage=p.kv_usage,
                    active_adapters=frozenset(p.running_adapters),
                    waiting_adapters=frozenset(p.waiting_adapters),
                    max_lora=p.max_loras,
                    block_size=p.block_size,
                    num_blocks=p.num_gpu_blocks,
                    updated_at=p.updated_at,
                ),
            )

    def observe(self, pods: Sequence[PodSnapshot], now: float) -> None:
        """Take the scrapes that landed since the last call (this replica's scraper, which runs
        whether or not this replica routes anything)."""
        self.now = now
        self._sync(pods)

    def route(self, tr: TraceRequest, pods: Sequence[PodSnapshot], now: float) -> int:
        self.observe(pods, now)
        model = tr.adapter or BASE_MODEL
        request = InferenceRequest(
            request_id=tr.request_id,
            model=model,
            target_model=model,
            prompt=tr.prompt,
            prompt_tokens=estimate_tokens(tr.prompt),
        )
        try:
            ranked = self.scheduler.schedule(request, self.endpoints)
        except Rejected as exc:
            return self.run.reject(tr.request_id, exc.reason)
        if not ranked:
            return self.run.reject(tr.request_id, "NoPick")
        self._tickets[tr.request_id] = self.store.load.acquire(ranked[0], request.prompt_tokens)
        return self.index[ranked[0].address]

    def finished(self, result: RequestResult) -> None:
        self.now = result.finish
        self._tickets.pop(result.request_id).release()
        self.run.finished(result)


class Front:
    """What stands between the clients and the pods: `replicas` epp replicas, each request to one
    of them at random, and for `bypass_share` of the requests nothing at all (a uniformly random
    pod, unseen by epp: another router, a client that found the pod's address). With one replica
    and no bypass it is exactly that replica (the base workload's policies are unchanged).

    KV events reach every replica's index (each subscribes to every pod, as active-active
    replicas do). Scrapes reach every replica at every arrival and every finish, whichever replica
    (if any) routes it: a real replica's scraper runs on its own, so a new scrape clears its
    unseen load and its peers hear of that `peer_lag` later, not when it next routes. (Taking
    scrapes only on a replica's own picks left a peer's unseen load stale for one of its
    inter-pick gaps, ~60 ms at 0.7 on the adversarial workloads, beyond the scrape that already
    showed it: the other replica counted those requests twice and steered around them.)
    """

    def __init__(self, replicas: Sequence[EppRouter], run: Run, bypass_share: float, seed: int,
                 peer_lag: float = 0.005) -> None:  # fmt: skip
        self.replicas = list(replicas)
        self.peer_lag = peer_lag
        self._mail: list[tuple[float, int, EppRouter, bytes]] = []  # peer messages in flight, by arrival
        self._mail_seq = itertools.count()
        self.run = run
        self.bypass_share = bypass_share
        self._rng = random.Random(seed ^ 0x5EED)
        self._owner: dict[str, EppRouter | None] = {}
        self.bypassed: set[str] = set()  # request ids no replica routed
        self.addresses = [e.address for e in self.replicas[0].endpoints]
        self._pods: Sequence[PodSnapshot] = ()

    def route(self, tr: TraceRequest, pods: Sequence[PodSnapshot], now: float) -> int:
        if len(self.replicas) == 1 and not self.bypass_share:
            return self.replicas[0].route(tr, pods, now)
        self._pods = pods  # the fleet's live snapshot list (updated in place at each scrape)
        self._observe(now)
        if self.bypass_share and self._rng.random() < self.bypass_share:
            self._owner[tr.request_id] = None
            self.bypassed.add(tr.request_id)
            return self._rng.randrange(len(pods))
        replica = self.replicas[self._rng.randrange(len(self.replicas))]
        self._owner[tr.request_id] = replica
        self._deliver(now)
        pod = replica.route(tr, pods, now)
        self._post(replica, now)
        return pod

    def finished(self, result: RequestResult) -> None:
        if len(self.replicas) == 1 and not self.bypass_share:
            self.replicas[0].finished(result)
            return
        owner = self._owner.pop(result.request_id)
        self._observe(result.finish)
        if owner is None:
            self.run.finished(result)
        else:
            self._deliver(result.finish)
            owner.finished(result)
            self._post(owner, result.finish)

    def _observe(self, now: float) -> None:
        """Every replica takes the scrapes that landed since the last event (see the class docstring)."""
        if len(self.replicas) < 2 or not self._pods:
            return
        self._deliver(now)
        for r in self.replicas:
            r.observe(self._pods, now)
            self._post(r, now)

    def _post(self, sender: EppRouter, now: float) -> None:
        """The replica's peer message, if it has news, reaches the others `peer_lag` later."""
        sync = sender.peer_sync
        if sync is not None and sync.dirty:
            payload = sync.encode()
            for r in self.replicas:
                if r is not sender:
                    heapq.heappush(self._mail, (now + self.peer_lag, next(self._mail_seq), r, payload))

    def _deliver(self, now: float) -> None:
        mail = self._mail
        while mail and mail[0][0] <= now:
            _, _, target, payload = heapq.heappop(mail)
            assert target.peer_sync is not None
            target.peer_sync.apply(payload)

    def kv_events(self, pod: int, frames: Sequence[bytes]) -> None:
        address = self.addresses[pod]
        for r in self.replicas:
            if r.kv_index is not None:
                r.kv_index.apply(address, frames)


class OracleRouter:
    """Lowest estimated TTFT from the true engine state at the instant of arrival.

    For each pod, the estimate adds up:

    1. the rest of the step in flight;
    2. prefill: the uncached prompt tokens queued ahead (running requests still prefilling,
       plus every waiting request's miss as estimated when the oracle placed it, or its whole
       context if it was preempted), plus this request's own miss, which is the true
       prefix-cache match on that pod. These tokens are spread over steps of
       `max_num_batched_tokens` minus one token per decoding request, each step timed with
       the profile's own step-time formula at the pod's current context;
    3. a KV wait: if the blocks needed by the waiting queue and this prompt exceed the free
       blocks, the time until enough running requests finish (fewest tokens left first);
       the same for `max_num_seqs`;
    4. LoRA: nothing if the adapter is in the running batch; a load if a slot is free;
       otherwise the time until the adapter that drains first leaves the batch.

    It does not plan ahead (future arrivals, the effect of its pick on later requests' ITL).
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.engines: Sequence[Engine] = ()
        self._miss: dict[str, int] = {}

    def route(self, tr: TraceRequest, _pods: Sequence[PodSnapshot], now: float) -> int:
        best, best_key, best_miss = 0, (math.inf, 0), 0
        prompts: dict[int, Prompt] = {}
        for i, engine in enumerate(self.engines):
            bs = engine.config.block_size
            if bs not in prompts:
                prompts[bs] = tokenize(tr.prompt, bs, tr.adapter)
            estimate, miss = self._estimate(engine, prompts[bs], tr, now)
            key = (estimate, len(engine.waiting) + len(engine.running))
            if key < best_key:
                best, best_key, best_miss = i, key, miss
        self._miss[tr.request_id] = best_miss
        return best

    def finished(self, result: RequestResult) -> None:
        self._miss.pop(result.request_id, None)
        self.run.finished(result)

    def _estimate(self, engine: Engine, prompt: Prompt, tr: TraceRequest, now: float) -> tuple[float, int]:
        cfg, profile, kv = engine.config, engine.profile, engine.kv
        hit = kv.match(prompt.block_hashes, (prompt.num_tokens - 1) // kv.block_size) * kv.block_size
        miss = prompt.num_tokens - hit
        ahead = decoding = context = 0
        for r in engine.running:
            left = r.prompt.num_tokens - r.num_computed
            if left > 0:
                ahead += left
            else:
                decoding += 1
            context += r.num_computed
        queued_blocks = 0
        for r in engine.waiting:
            todo = r.total_tokens if r.preemptions else self._miss.get(r.request_id, r.prompt.num_tokens)
            ahead += todo
            queued_blocks += kv.blocks_for(todo)
        t = 0.0
        step_end = engine.next_event_time()
        if engine.busy and step_end is not None:
            t += max(0.0, step_end - now)
        work = ahead + miss
        per_step = max(1, cfg.max_num_batched_tokens - decoding)
        steps = max(1, math.ceil(work / per_step))
        n_adapters = len(engine.state().running_adapters)
        step_s = profile.step_time(decoding + math.ceil(work / steps), context + work // steps, 0.0, n_adapters)
        t += steps * step_s + profile.prefill_attn_s * miss * (hit + miss / 2)
        decode_s = profile.step_time(decoding + 1, context, 0.0, n_adapters)
        blocks_short = queued_blocks + kv.blocks_for(miss) - (kv.usable - kv.used)
        seats_short = len(engine.running) + len(engine.waiting) + 1 - cfg.max_num_seqs
        if blocks_short > 0 or seats_short > 0:
            t += self._drain_wait(engine.running, blocks_short, seats_short) * decode_s
        if tr.adapter:
            t += self._lora_wait(engine, tr.adapter, decode_s)
        return t, miss

    @staticmethod
    def _drain_wait(running: Sequence[SimRequest], blocks: int, seats: int) -> int:
        """Decode steps until enough running requests finish to free `blocks` and `seats`."""
        steps = 0
        for r in sorted(running, key=lambda r: r.max_tokens - r.num_output):
            if blocks <= 0 and seats <= 0:
                break
            steps = r.max_tokens - r.num_output
            blocks -= r.blocks.num_blocks
            seats -= 1
        return steps  # if even a full drain falls short, the queued prefill above already counts the rest

    @staticmethod
    def _lora_wait(engine: Engine, adapter: str, decode_s: float) -> float:
        running: dict[str, int] = {}
        for r in engine.running:
            if r.adapter:
                running[r.adapter] = max(running.get(r.adapter, 0), r.max_tokens - r.num_output)
        if adapter in running:
            return 0.0
        if len(running) < engine.config.max_loras:
            return engine.profile.lora_load_s
        return min(running.values()) * decode_s + engine.profile.lora_load_s


@dataclass(frozen=True, slots=True)
class Task:
    policy: str
    load: float
    rate: float
    duration: float
    workload: Workload
    scrape_interval: float
    warmup: float
    seed: int
    scenario: str = "base"
    kv_event_lag: float = 0.001
    peer_lag: float | None = 0.005  # None: replicas share nothing but events and scrapes


@lru_cache(maxsize=2)
def _trace(workload: Workload, rate: float, duration: float) -> tuple[TraceRequest, ...]:
    return tuple(make_trace(workload, rate, duration))


def run_policy(task: Task) -> dict[str, Any]:
    """Replay the load level's trace under one policy and summarise it."""
    started = time.process_time()
    scenario = SCENARIOS[task.scenario]
    trace = _trace(task.workload, task.rate, task.duration)
    run = Run(len(trace))
    precise = task.policy == "epp-precise"
    router: OracleRouter | Front
    if task.policy == "oracle":
        router = OracleRouter(run)
    else:
        peers = scenario.replicas > 1 and task.peer_lag is not None
        replicas = [EppRouter(task.policy, run, PODS, task.seed + k, kv_events=precise, peers=peers)
                    for k in range(scenario.replicas)]  # fmt: skip
        router = Front(replicas, run, scenario.bypass_share, task.seed, task.peer_lag or 0.0)
    kv_topics = [f"kv@10.0.0.{i + 1}:8000@{BASE_MODEL}" for i in range(PODS)]
    fleet = VirtualFleet(
        scenario.configs() if task.scenario != "base" else fleet_configs(PODS),
        router=router.route,
        scrape_interval=task.scrape_interval,
        on_finish=router.finished,
        on_kv_events=router.kv_events if isinstance(router, Front) and precise else None,
        kv_event_lag=task.kv_event_lag,
        kv_topics=kv_topics,
        faults=scenario.faults(trace[0].arrival, trace[-1].arrival),
    )
    if isinstance(router, OracleRouter):
        router.engines = fleet.engines
    run.gate(fleet.engines)
    with contextlib.suppress(_Drained):
        fleet.run(trace)
    row = summarise(run, fleet.engines, trace, task.warmup, router.bypassed if isinstance(router, Front) else set())
    indexes = [r.kv_index for r in router.replicas if r.kv_index is not None] if isinstance(router, Front) else []
    events = sum(i.stats.events for i in indexes)
    return {
        "bench": "routing_quality",
        "policy": task.policy,
        "load": task.load,
        **row,
        "rate_rps": round(task.rate, 3),
        "cpu_s": round(time.process_time() - started, 2),
        "workload": task.scenario,
        "replicas": scenario.replicas if task.policy != "oracle" else 1,
        "bypass_share": scenario.bypass_share,
        "restarts": len(scenario.faults(trace[0].arrival, trace[-1].arrival)),
        "peer_sync": scenario.replicas > 1 and task.peer_lag is not None and task.policy != "oracle",
        "kv_events": events,
        "kv_us_per_event": sum(i.stats.apply_seconds for i in indexes) / events * 1e6 if events else math.nan,
        "kv_resets": sum(i.stats.resets for i in indexes),
        "kv_orphans": sum(i.stats.orphans for i in indexes),
        "kv_index_blocks": sum(len(i) for i in indexes),
    }


def _tokens_within(r: RequestResult, a: float, b: float) -> float:
    """Output tokens `r` generated in [a, b]: the first at `first_token`, the rest evenly up to `finish`."""
    n = float(a <= r.first_token <= b)
    if r.output_tokens > 1 and r.finish > r.first_token:
        overlap = min(b, r.finish) - max(a, r.first_token)
        n += (r.output_tokens - 1) * max(0.0, overlap) / (r.finish - r.first_token)
    return n


def summarise(run: Run, engines: Sequence[Engine], trace: Sequence[TraceRequest], warmup: float,
              bypassed: Collection[str] = ()) -> dict[str, Any]:  # fmt: skip
    results = run.results
    cutoff = trace[0].arrival + warmup
    if cutoff >= trace[-1].arrival:
        raise ValueError(f"--warmup {warmup} s leaves nothing to measure in a {trace[-1].arrival:.0f} s trace")
    measured = [r for r in results if r.arrival >= cutoff]
    ttft = sorted(r.ttft for r in measured)
    itl = sorted(r.itl for r in measured)
    prompt = sum(r.prompt_tokens for r in measured)
    window = (cutoff, trace[-1].arrival)
    span = window[1] - window[0]
    on_lora = {r.request_id for r in trace if r.adapter}
    per_pod = Counter(r.pod for r in results)
    return {
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        # the requests an epp replica routed (the rest went to a random pod: `bypass_share`)
        "ttft_p50_routed_s": percentile((r.ttft for r in measured if r.request_id not in bypassed), 50),
        "ttft_p90_routed_s": percentile((r.ttft for r in measured if r.request_id not in bypassed), 90),
        "itl_p50_s": percentile(itl, 50),
        "itl_p90_s": percentile(itl, 90),
        "output_tokens_per_s": sum(_tokens_within(r, *window) for r in results) / span,
        "offered_tokens_per_s": sum(r.max_tokens for r in trace if r.arrival >= cutoff) / span,
        "prefix_hit_rate": sum(r.cached_tokens for r in measured) / prompt if prompt else math.nan,
        "lora_swaps": sum(e.counters.lora_loads for e in engines),
        "preemptions": sum(e.counters.preemptions for e in engines),
        "rejected": sum(run.rejected.values()),
        "rejected_by_reason": dict(run.rejected),
        # Diagnostics: where the tail comes from (LoRA slots vs the rest) and hot-spotting.
        "ttft_p90_base_s": percentile((r.ttft for r in measured if r.request_id not in on_lora), 90),
        "ttft_p90_lora_s": percentile((r.ttft for r in measured if r.request_id in on_lora), 90),
        "max_pod_share": max(per_pod.values()) / len(results) if results else math.nan,
        "drain_s": max(r.finish for r in results) - trace[-1].arrival if results else math.nan,
        "measured": len(measured),
        "completed": len(results),
        "requests": len(trace),
    }


# ---- checks, table, plot --------------------------------------------------------------------


def target_checks(rows: Sequence[dict[str, Any]], load: float) -> list[dict[str, Any]]:
    """The issue's targets at one load level, computed from the rows.

    Throughput must be at least every other real policy's; against the oracle (which knows
    the true state), TTFT p90 and throughput must be within 15 %.
    """
    at = {r["policy"]: r for r in rows if r["load"] == load and r["workload"] == "base"}
    epp = at.get("epp-default")
    if epp is None:
        return []
    checks = []

    def ratio(name: str, metric: str, other: str, op: str, limit: float) -> None:
        if other not in at:
            return
        value = epp[metric] / at[other][metric]
        ok = value <= limit if op == "<=" else value >= limit
        checks.append({"load": load, "check": name, "ratio": value, "target": f"{op} {limit}", "pass": ok})

    ratio("TTFT p90 epp-default / round-robin", "ttft_p90_s", "round-robin", "<=", 0.3)
    ratio("TTFT p90 epp-default / gie-default", "ttft_p90_s", "gie-default", "<=", 0.8)
    for other in EPP_POLICIES:
        if other != "epp-default":
            ratio(f"output tok/s epp-default / {other}", "output_tokens_per_s", other, ">=", 1.0)
    ratio("TTFT p90 epp-default / oracle", "ttft_p90_s", "oracle", "<=", 1.15)
    ratio("output tok/s epp-default / oracle", "output_tokens_per_s", "oracle", ">=", 0.85)
    return checks


def event_checks(rows: Sequence[dict[str, Any]], load: float) -> list[dict[str, Any]]:
    """The KV-event targets at one load: on every adversarial workload, epp-precise's TTFT p90 at
    most half of epp-approx's; two epp-precise replicas within 1.2x of one replica's p90 on the
    same trace (the workload with `replicas: 1` and otherwise the same scenario)."""
    at = {(r["workload"], r["policy"]): r for r in rows if r["load"] == load}
    checks = []
    for name, sc in SCENARIOS.items():
        precise, approx = at.get((name, "epp-precise")), at.get((name, "epp-approx"))
        if sc != Scenario(groups=sc.groups) and precise and approx:  # an adversity (not base or many-apps)
            value = precise["ttft_p90_s"] / approx["ttft_p90_s"]
            # floor: the same trace without the adversity (one replica, all memory, nothing bypassed or
            # restarted) under epp-precise, over epp-approx here: how far below epp-approx any policy
            # could get if the adversity cost nothing
            twin = next((n for n, t in SCENARIOS.items() if t == Scenario(groups=sc.groups)), None)
            free = at.get((twin, "epp-precise")) if twin and twin != name else None
            floor = free["ttft_p90_s"] / approx["ttft_p90_s"] if free else None
            checks.append({"load": load, "check": f"TTFT p90 epp-precise / epp-approx [{name}]", "ratio": value,
                           "target": "<= 0.5", "pass": value <= 0.5, "floor": floor})  # fmt: skip
            if sc.bypass_share:  # the same over the requests epp routed (bypassed ones go to a random pod)
                value = precise["ttft_p90_routed_s"] / approx["ttft_p90_routed_s"]
                floor = free["ttft_p90_routed_s"] / approx["ttft_p90_routed_s"] if free else None
                checks.append({"load": load, "check": f"routed TTFT p90 epp-precise / epp-approx [{name}]",
                               "ratio": value, "target": "<= 0.5", "pass": value <= 0.5, "floor": floor})  # fmt: skip
        if sc.replicas > 1:
            twin = next((n for n, t in SCENARIOS.items() if t == dataclasses.replace(sc, replicas=1)), None)
            for policy in EVENT_POLICIES:
                many, one = at.get((name, policy)), at.get((twin, policy)) if twin else None
                if many and one:
                    value = many["ttft_p90_s"] / one["ttft_p90_s"]
                    target = policy == "epp-precise"
                    checks.append({"load": load, "check": f"TTFT p90 {policy} {sc.replicas} replicas / 1 [{name}]",
                                   "ratio": value, "target": "<= 1.2" if target else "(none)",
                                   "pass": value <= 1.2 if target else None})  # fmt: skip
                    if sc.bypass_share:
                        value = many["ttft_p90_routed_s"] / one["ttft_p90_routed_s"]
                        checks.append({"load": load, "ratio": value, "target": "<= 1.2" if target else "(none)",
                                       "check": f"routed TTFT p90 {policy} {sc.replicas} replicas / 1 [{name}]",
                                       "pass": value <= 1.2 if target else None})  # fmt: skip
    return checks


def median_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, policy, load): the median of every number over the seeds."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["policy"], r["load"]), []).append(r)
    out = []
    for same in groups.values():
        row = dict(same[0])
        for k, v in row.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "load":
                row[k] = statistics.median(r[k] for r in same)
        row["seed"] = "median"
        row["seeds"] = [r["seed"] for r in same]
        out.append(row)
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'workload':<15}{'policy':<15}{'load':>5}{'req/s':>7}{'TTFT p50':>10}{'p90':>9}{'p99':>9}{'routed p90':>11}"
        f"{'ITL p50':>9}"
        f"{'p90':>8}{'out tok/s':>10}{'hit%':>6}{'lora':>6}{'preempt':>8}{'429':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['workload']:<15}{r['policy']:<15}{r['load']:>5.2f}{r['rate_rps']:>7.1f}"
            f"{r['ttft_p50_s'] * 1e3:>8.0f}ms{r['ttft_p90_s'] * 1e3:>7.0f}ms{r['ttft_p99_s'] * 1e3:>7.0f}ms"
            f"{r['ttft_p90_routed_s'] * 1e3:>9.0f}ms"
            f"{r['itl_p50_s'] * 1e3:>7.1f}ms{r['itl_p90_s'] * 1e3:>6.1f}ms"
            f"{r['output_tokens_per_s']:>10.0f}{r['prefix_hit_rate'] * 100:>6.1f}{r['lora_swaps']:>6}"
            f"{r['preemptions']:>8}{r['rejected']:>5}"
        )
    return "\n".join(lines)


def format_checks(checks: Sequence[dict[str, Any]]) -> str:
    return "\n".join(
        f"load {c['load']:.2f}  {c['check']:<58} {c['ratio']:7.3f}  target {c['target']:<7} "
        f"{'-' if c['pass'] is None else 'PASS' if c['pass'] else 'MISS'}"
        + (f"  (floor {c['floor']:.3f}: without the adversity)" if c.get("floor") is not None else "")
        for c in checks
    )


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_ttft, ax_tput) = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy in POLICIES:
        mine = sorted((r for r in rows if r["policy"] == policy and r["workload"] == "base"), key=lambda r: r["load"])
        if not mine:
            continue
        loads = [r["load"] for r in mine]
        style = {"linewidth": 2.5} if policy == "epp-default" else {"linestyle": "--"} if policy == "oracle" else {}
        ax_ttft.plot(loads, [r["ttft_p90_s"] for r in mine], marker="o", label=policy, **style)
        ax_tput.plot(loads, [r["output_tokens_per_s"] for r in mine], marker="o", label=policy, **style)
    offered = sorted({r["load"]: r["offered_tokens_per_s"] for r in rows if r["workload"] == "base"}.items())
    ax_tput.plot([x for x, _ in offered], [y for _, y in offered], color="grey", linestyle=":", label="offered")
    ax_tput.legend()
    ax_ttft.set(xlabel="load (fraction of fleet capacity)", ylabel="TTFT p90 (s)", yscale="log", title="TTFT p90")
    ax_tput.set(xlabel="load (fraction of fleet capacity)", ylabel="output tokens/s", title="Output throughput")
    for ax in (ax_ttft, ax_tput):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- main ---------------------------------------------------------------------------------------


def _loads(text: str) -> list[float]:
    """Comma-separated positive fractions of capacity, e.g. 0.5,0.7,0.85 (sorted, duplicates dropped)."""
    return sorted(set(float_list(text)))


def _policies(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(names) - set(POLICIES))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown policies {', '.join(unknown) or '(none given)'} "
                                         f"(choose from {', '.join(POLICIES)})")
    return names


def _workloads(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown workloads {', '.join(unknown) or '(none given)'} "
                                         f"(choose from {', '.join(SCENARIOS)})")
    return list(dict.fromkeys(names))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="loads 0.5,0.7,0.85, 100 s of arrivals (< 5 min, 2 cores)")
    p.add_argument("--json", action="store_true", help="one JSON object per (policy, load) on stdout; table to stderr")
    p.add_argument("--loads", type=_loads, help="fractions of capacity (default 0.3,0.5,0.7,0.8,0.85,0.9)")
    p.add_argument("--duration", type=positive_float,
                   help="seconds of arrivals per trace (default 200; 100 with --quick)")
    p.add_argument("--policies", type=_policies, default=None,
                   help="comma-separated subset of: " + ", ".join(POLICIES) + " (default: on base "
                   + ", ".join(BASE_POLICIES) + ", plus epp-approx and epp-precise when other workloads "
                   "run; on the others epp-approx and epp-precise)")
    p.add_argument("--workloads", type=_workloads, default=["base"],
                   help="comma-separated subset of: " + ", ".join(SCENARIOS) + " (default base)")
    p.add_argument("--kv-event-lag", type=non_negative_float, default=0.001,
                   help="seconds from the step that produced a KV event to the replicas applying it (0.001)")
    p.add_argument("--peer-lag", type=non_negative_float, default=0.005,
                   help="seconds from a replica's change to its peers applying it (0.005: epp's 5 ms send interval)")
    p.add_argument("--no-peer-sync", action="store_true",
                   help="replicas share nothing but KV events and scrapes (no epp.datalayer.peers)")
    p.add_argument("--capacity", type=positive_float, help="fleet capacity in requests/s (skips the calibration run)")
    p.add_argument("--scrape-interval", type=positive_float, default=0.05,
                   help="seconds between metric scrapes (0.05)")
    p.add_argument("--warmup", type=non_negative_float, default=40.0,
                   help="seconds of virtual time left out of the stats (40)")
    p.add_argument("--seed", type=int, default=0, help="workload and scheduler seed (0)")
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",") if x.strip()],
                   help="several seeds (e.g. 0,1,2): every row once per seed, then median rows (seed 'median') "
                        "that the table and the checks use")  # fmt: skip
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1, help="worker processes (CPU count)")
    p.add_argument("--out", type=Path, metavar="PREFIX",
                   help="write PREFIX.json, PREFIX.jsonl and PREFIX.png (default: write nothing)")
    args = p.parse_args(argv)
    args.loads = args.loads or ([0.5, 0.7, 0.85] if args.quick else [0.3, 0.5, 0.7, 0.8, 0.85, 0.9])
    if args.duration is None:
        args.duration = 100.0 if args.quick else 200.0
    if args.warmup >= args.duration:
        p.error(f"--warmup {args.warmup:g} s leaves nothing to measure in {args.duration:g} s of arrivals")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = Output(args.json)
    say = out.say
    workload = Workload(seed=args.seed)
    capacity = args.capacity
    if capacity is None:
        capacity = calibrate_capacity(workload)
        say(f"capacity: {capacity:.1f} requests/s (saturation throughput of {PODS} pods, calibration run)")
    sparsest = _trace(workload, args.loads[0] * capacity, args.duration)  # fewest arrivals, latest first one
    if len(sparsest) < 2 or sparsest[0].arrival + args.warmup >= sparsest[-1].arrival:
        print(f"{Path(sys.argv[0]).name}: error: at load {args.loads[0]:g} the {args.duration:g} s trace has "
              f"{len(sparsest)} arrivals, none after --warmup {args.warmup:g} s", file=sys.stderr)
        return 2
    tasks = []
    seeds = args.seeds or [args.seed]
    for seed, name in ((seed, name) for seed in seeds for name in args.workloads):
        wl = SCENARIOS[name].workload(seed)
        if args.policies is not None:
            policies = args.policies
        elif name == "base":
            policies = [*BASE_POLICIES, *(EVENT_POLICIES if len(args.workloads) > 1 else ())]
        else:
            policies = list(EVENT_POLICIES)
        tasks += [
            Task(policy, load, load * capacity, args.duration, wl, args.scrape_interval, args.warmup,
                 seed, name, args.kv_event_lag, None if args.no_peer_sync else args.peer_lag)
            for load in args.loads
            for policy in policies
        ]  # fmt: skip
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(run_policy, tasks))
    for row, task in zip(rows, tasks, strict=True):
        row["capacity_rps"] = round(capacity, 3)
        row["seed"] = task.seed
        out.row(row)
    every = list(rows)  # per seed, then (with several seeds) the medians: what --out writes
    if len(seeds) > 1:
        rows = median_rows(rows)
        every += rows
        for row in rows:
            out.row(row)
        say(f"medians over seeds {','.join(map(str, seeds))}:")
    say(format_table(rows))
    checks = [c for load in args.loads if load >= min(0.85, args.loads[-1]) for c in target_checks(rows, load)]
    checks += [c for load in args.loads for c in event_checks(rows, load)]
    say("\ntargets (computed from the rows above):\n" + format_checks(checks))
    if args.out is not None:
        write_results(args.out, args, workload, capacity, every, checks, time.monotonic() - started, say)
    say(f"wall time {time.monotonic() - started:.0f} s")
    return 0


def write_results(
    prefix: Path,
    args: argparse.Namespace,
    workload: Workload,
    capacity: float,
    rows: Sequence[dict[str, Any]],
    checks: Sequence[dict[str, Any]],
    wall_s: float,
    say: Callable[[str], None],
) -> None:
    """PREFIX.json (parameters, rows, checks), PREFIX.jsonl (one row per line) and PREFIX.png."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "workload": asdict(workload),
        "pods": PODS,
        "capacity_rps": capacity,
        "scrape_interval_s": args.scrape_interval,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "rows": rows,
        "checks": checks,
        "wall_s": round(wall_s, 1),
    }
    json_path, jsonl_path, png_path = (prefix.with_name(prefix.name + ext) for ext in (".json", ".jsonl", ".png"))
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    jsonl_path.write_text("".join(json_line(row) + "\n" for row in rows))
    title = f"{PODS} h100-8b pods, capacity {capacity:.1f} req/s, {args.duration:.0f} s of arrivals per load"
    drawn = plot([r for r in rows if r.get("seed") == "median"] or rows, png_path, title)
    say(f"\nwrote {json_path}, {jsonl_path}" + (f" and {png_path}" if drawn else ""))
    if not drawn:
        say("matplotlib is not installed: no plot (pip install matplotlib)")


if __name__ == "__main__":
    sys.exit(main())
