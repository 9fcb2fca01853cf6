"""Virtual-time fleet: replay a request trace over N engines with a routing callback.

Owns the discrete-event loop (arrivals, step ends, optional periodic scrapes), the
`TraceRequest` / `RequestResult` records, and the `PodSnapshot` a router sees. No asyncio and
no clock: a minute of traffic over many pods runs in well under a second of CPU per thousand
requests, so policies and loads can be swept quickly.

    fleet = VirtualFleet([EngineConfig()] * 4, router=least_queue)
    results = fleet.run(trace)

Event order at equal times: arrivals, then step ends, then scrapes, so requests arriving
together are batched together and a scrape sees the state after the step it coincides with.

KV-cache events (`on_kv_events=`): each pod's prefix cache publishes vLLM KV events exactly as
a real-time pod does (`kvevents.py`: three frames, consecutive sequence numbers per pod, one
batch per engine step, stamped with the virtual time), delivered to the callback
`kv_event_lag` seconds of virtual time after the step that produced them.  `faults=` injects
`(time, pod, kind)` events: `"restart"` (`Engine.restart`: empty cache, running requests start
over, sequence numbers from 0 again, no event) or `"clear"` (a prefix-cache reset, published as
`AllBlocksCleared`; skipped while requests hold cached blocks).

Invariants: `run` is deterministic for a given trace, configs and router; a router sees
scraped state only (when `scrape_interval` is set) or the live state (when it is None).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from epp_sim.domain import EngineConfig, SimRequest
from epp_sim.engine import Engine
from epp_sim.kvevents import EventLog, encode_batch, frames
from epp_sim.tokenizer import tokenize

__all__ = [
    "PodSnapshot",
    "RequestResult",
    "Router",
    "TraceRequest",
    "VirtualFleet",
    "least_queue",
    "round_robin",
]

_ARRIVAL, _STEP, _SCRAPE, _KV, _FAULT = 0, 1, 2, 3, 4

KVEventsHook = Callable[[int, Sequence[bytes]], None]  # pod index, the message's three frames
FAULTS = ("restart", "clear")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace: when it arrives and what it asks for."""

    arrival: float
    prompt: str
    max_tokens: int
    adapter: str | None = None
    request_id: str = ""
    cache_salt: str | None = None


@dataclass(frozen=True, slots=True)
class PodSnapshot:
    """What a router knows about one pod (the scraped vLLM gauges)."""

    index: int
    name: str
    waiting: int
    running: int
    kv_usage: float
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    max_loras: int
    block_size: int
    num_gpu_blocks: int
    updated_at: float


Router = Callable[[TraceRequest, Sequence[PodSnapshot], float], int]


@dataclass(frozen=True, slots=True)
class RequestResult:
    """Latencies of one finished request, in seconds of simulated time."""

    request_id: str
    pod: int
    arrival: float
    first_token: float
    finish: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    preemptions: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    @property
    def itl(self) -> float:
        """Mean inter-token latency (0 for single-token outputs)."""
        if self.output_tokens < 2:
            return 0.0
        return (self.finish - self.first_token) / (self.output_tokens - 1)


def result_of(req: SimRequest, pod: int) -> RequestResult:
    """The `RequestResult` of a finished engine request."""
    if req.first_token_time is None or req.finish_time is None:
        raise ValueError(f"request {req.request_id} has not finished")
    return RequestResult(
        request_id=req.request_id,
        pod=pod,
        arrival=req.arrival,
        first_token=req.first_token_time,
        finish=req.finish_time,
        prompt_tokens=req.prompt.num_tokens,
        cached_tokens=req.cached_tokens,
        output_tokens=req.num_output,
        preemptions=req.preemptions,
    )


def round_robin() -> Router:
    """A router that cycles through the pods."""
    counter = itertools.count()

    def route(_req: TraceRequest, pods: Sequence[PodSnapshot], _now: float) -> int:
        return next(counter) % len(pods)

    return route


def least_queue(_req: TraceRequest, pods: Sequence[PodSnapshot], _now: float) -> int:
    """Route to the pod with the fewest waiting, then running, requests (lowest index wins ties)."""
    return min(pods, key=lambda p: (p.waiting, p.running, p.index)).index


class VirtualFleet:
    """N engines in virtual time behind one routing callback."""

    def __init__(
        self,
        configs: Sequence[EngineConfig],
        router: Router,
        *,
        scrape_interval: float | None = None,
        on_finish: Callable[[RequestResult], None] | None = None,
        names: Sequence[str] | None = None,
        on_kv_events: KVEventsHook | None = None,
        kv_event_lag: float = 0.0,
        kv_topics: Sequence[str] | None = None,
        kv_event_form: str = "map",
        faults: Iterable[tuple[float, int, str]] = (),
    ) -> None:
        if not configs:
            raise ValueError("a fleet needs at least one pod")
        self.engines = [Engine(c) for c in configs]
        self.names = list(names) if names is not None else [f"pod-{i}" for i in range(len(configs))]
        self._router = router
        self._scrape_interval = scrape_interval
        self._on_finish = on_finish
        self._faults = sorted(faults)
        for _, pod, kind in self._faults:
            if kind not in FAULTS or not 0 <= pod < len(self.engines):
                raise ValueError(f"bad fault {kind!r} on pod {pod}")
        self._on_kv = on_kv_events
        self._kv_lag = kv_event_lag
        self._kv_form = kv_event_form
        self._kv_topics = [t.encode() for t in (kv_topics or [f"kv@{n}@" for n in self.names])]
        self._kv_seq = [0] * len(self.engines)
        if on_kv_events is not None:
            for engine in self.engines:
                engine.kv.events = EventLog()
        self._snapshots = [self._snapshot(i, 0.0) for i in range(len(self.engines))]
        self._versions = [-1] * len(self.engines)

    def _snapshot(self, i: int, now: float) -> PodSnapshot:
        engine = self.engines[i]
        state = engine.state()
        cfg = engine.config
        return PodSnapshot(
            index=i,
            name=self.names[i],
            waiting=state.waiting,
            running=state.running,
            kv_usage=state.kv_usage,
            running_adapters=state.running_adapters,
            waiting_adapters=state.waiting_adapters,
            max_loras=cfg.max_loras,
            block_size=cfg.block_size,
            num_gpu_blocks=cfg.num_gpu_blocks,
            updated_at=now,
        )

    def _publish(self, i: int, now: float, heap: list[tuple[float, int, int, int]], seq: Iterator[int],
                 pending: dict[int, tuple[int, list[bytes]]]) -> None:  # fmt: skip
        log = self.engines[i].kv.events
        if log is None or not log.events or self._on_kv is None:
            return
        msg = frames(self._kv_topics[i], self._kv_seq[i], encode_batch(now, log.drain(), 0, self._kv_form))
        self._kv_seq[i] += 1
        if self._kv_lag <= 0:
            self._on_kv(i, msg)
            return
        k = next(seq)
        pending[k] = (i, msg)
        heapq.heappush(heap, (now + self._kv_lag, _KV, k, k))

    def _view(self, now: float) -> list[PodSnapshot]:
        if self._scrape_interval is None:
            for i, engine in enumerate(self.engines):
                if self._versions[i] != engine.version:
                    self._snapshots[i] = self._snapshot(i, now)
                    self._versions[i] = engine.version
        return self._snapshots

    def run(self, trace: Iterable[TraceRequest]) -> list[RequestResult]:
        """Replay `trace` to completion; results are in finish order."""
        arrivals = sorted(trace, key=lambda r: r.arrival)
        results: list[RequestResult] = []
        heap: list[tuple[float, int, int, int]] = []
        seq = itertools.count()
        pending: list[float | None] = [None] * len(self.engines)
        n = len(self.engines)
        for k, tr in enumerate(arrivals):
            heapq.heappush(heap, (tr.arrival, _ARRIVAL, next(seq), k))
        if self._scrape_interval is not None and arrivals:
            for i in range(n):
                first = arrivals[0].arrival + self._scrape_interval * i / n
                heapq.heappush(heap, (first, _SCRAPE, next(seq), i))
        outstanding = len(arrivals)
        messages: dict[int, tuple[int, list[bytes]]] = {}
        for k, (t, _, _) in enumerate(self._faults):
            heapq.heappush(heap, (t, _FAULT, next(seq), k))

        def schedule(i: int) -> None:
            t = self.engines[i].next_event_time()
            if t is not None and t != pending[i]:
                pending[i] = t
                heapq.heappush(heap, (t, _STEP, next(seq), i))

        while heap:
            now, kind, _, x = heapq.heappop(heap)
            if kind == _ARRIVAL:
                tr = arrivals[x]
                pod = self._router(tr, self._view(now), now)
                engine = self.engines[pod]
                block_size = engine.config.block_size
                req = SimRequest(
                    request_id=tr.request_id or str(x),
                    prompt=tokenize(tr.prompt, block_size, tr.adapter, tr.cache_salt),
                    max_tokens=tr.max_tokens,
                    arrival=tr.arrival,
                    adapter=tr.adapter,
                )
                engine.add_request(req)
                schedule(pod)
            elif kind == _STEP:
                if pending[x] != now:
                    continue
                pending[x] = None
                for out in self.engines[x].advance(now):
                    for req in out.finished:
                        result = result_of(req, x)
                        results.append(result)
                        outstanding -= 1
                        if self._on_finish is not None:
                            self._on_finish(result)
                self._publish(x, now, heap, seq, messages)
                if self.engines[x].busy:  # idle, or stuck until the next arrival
                    schedule(x)
            elif kind == _KV:
                pod, msg = messages.pop(x)
                if self._on_kv is not None:
                    self._on_kv(pod, msg)
            elif kind == _FAULT:
                _, pod, what = self._faults[x]
                engine = self.engines[pod]
                if what == "restart":
                    engine.restart()
                    self._kv_seq[pod] = 0
                    if engine.kv.events is not None:
                        engine.kv.events.drain()  # a new process: nothing of the old one is sent
                else:
                    engine.kv.clear()
                self._publish(pod, now, heap, seq, messages)
                schedule(pod)
            else:
                self._snapshots[x] = self._snapshot(x, now)
                if outstanding > 0 and self._scrape_interval is not None:
                    heapq.heappush(heap, (now + self._scrape_interval, _SCRAPE, next(seq), x))
        return results
