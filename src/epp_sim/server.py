"""One simulated vLLM pod over HTTP (aiohttp), and a fleet of them in one process.

Owns `SimPod` (engine + real-time runner + metrics + aiohttp app on its own socket; the
endpoints themselves are in `handlers.py`), `SimFleet`, and test hooks that avoid sleeping:
`await pod.requests_seen(n)`, `await pod.idle()`, `pod.pause()`/`resume()`, `pod.set_metrics()`,
and `pod.completed` (finished requests with their engine timings).

    async with SimFleet(PodConfig(engine=EngineConfig(profile=FAST)), pods=3) as fleet:
        url = fleet.pods[0].url          # bound on 127.0.0.1, port chosen by the OS

KV-cache events (`PodConfig.kv_events_endpoint`, e.g. `tcp://127.0.0.1:0`): the pod binds a
ZMQ publisher there (`kvevents.KVEventPublisher`) and, after every engine step that changed its
prefix cache, publishes one vLLM `EventBatch` on the topic `kv_events_topic` (a template:
`{address}` = the pod's `host:port`, `{name}`, `{model}` = the first served name; default
`kv@{address}@{model}`, llm-d's convention).  `pod.kv_events` is the publisher (`endpoint`,
`seq`, `await subscribed(n)`); `await pod.restart()` imitates a process restart on the same
addresses (empty cache, sequence numbers from 0).

Invariants: a pod binds its socket itself (port 0 → OS-chosen) and reports the bound port;
`aclose()` is idempotent and aborts in-flight requests; every response carries `x-sim-pod`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web

from epp_sim.domain import EngineConfig, SimRequest
from epp_sim.engine import Engine, StepOutput
from epp_sim.handlers import OpenAIHandlers
from epp_sim.kvevents import EventLog, KVEventPublisher
from epp_sim.metrics import MetricsOverride, PodMetrics
from epp_sim.realtime import EngineRunner

__all__ = ["DEFAULT_LORA_MODULES", "LoraModule", "PodConfig", "SimFleet", "SimPod"]


@dataclass(frozen=True, slots=True)
class LoraModule:
    """A LoRA adapter: the name clients put in `model`, and where it lives."""

    name: str
    path: str


# The adapters of the reference scenario's vLLM deployments.
DEFAULT_LORA_MODULES = tuple(
    [LoraModule(f"sql-lora{s}", f"/adapters/yard1/llama-2-7b-sql-lora-test_{i}")
     for i, s in enumerate(["", "-1", "-2", "-3", "-4"])]
    + [LoraModule(f"tweet-summary{s}", f"/adapters/vineetsharma/qlora-adapter-Llama-2-7b-hf-TweetSumm_{i}")
       for i, s in enumerate(["", "-1", "-2", "-3", "-4"])]
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class PodConfig:
    """Everything one simulated pod is started with (vLLM flag names)."""

    name: str = "pod-0"
    model: str = "/model/llama2"
    served_model_names: tuple[str, ...] = ()
    lora_modules: tuple[LoraModule, ...] = DEFAULT_LORA_MODULES
    engine: EngineConfig = field(default_factory=EngineConfig)
    metrics_format: str = "vllm-0.33"
    seed: int = 0
    kv_events_endpoint: str | None = None  # ZMQ endpoint to bind, e.g. tcp://127.0.0.1:5557 (None: no events)
    kv_events_topic: str = "kv@{address}@{model}"
    kv_events_form: str = "map"  # vLLM's current map-encoded events, or "array" (older releases)

    @property
    def served_names(self) -> tuple[str, ...]:
        """Names the base model answers to; the first labels the metrics."""
        return self.served_model_names or (self.model,)


async def _bind(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class SimPod:
    """One simulated vLLM server: engine, metrics and HTTP endpoints."""

    def __init__(self, config: PodConfig | None = None) -> None:
        self.config = config or PodConfig()
        self.name = self.config.name
        self.engine = Engine(self.config.engine)
        self.metrics = PodMetrics(
            self.config.served_names[0],
            self.config.engine,
            metrics_format=self.config.metrics_format,
            lora_enabled=self.config.engine.max_loras > 0,
        )
        self.adapters: dict[str, str] = {m.name: m.path for m in self.config.lora_modules}
        self.requests_received = 0
        self.tokenize_received = 0  # POST /tokenize calls
        self.completed: deque[SimRequest] = deque(maxlen=10_000)
        self.host = ""
        self.port = 0
        self._seen_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._idle_waiters: list[asyncio.Future[None]] = []
        self.runner = EngineRunner(self.engine, on_step=self._on_step, on_change=self._on_change)
        self._web: web.AppRunner | None = None
        self.kv_events: KVEventPublisher | None = None
        self._closed = False

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:41234`."""
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """`host:port`, as an endpoint picker addresses the pod."""
        return f"{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind `host:port` (0 = any free port), start serving and return the bound port."""
        handlers = OpenAIHandlers(self)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        handlers.register(app)
        self._web = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._web.setup()
        sock = await _bind(host, port)
        site = web.SockSite(self._web, sock)
        try:
            await site.start()
        except BaseException:
            sock.close()
            await self._web.cleanup()
            raise
        self.host = host
        self.port = sock.getsockname()[1]
        if self.config.kv_events_endpoint is not None:
            try:
                self._start_kv_events(self.config.kv_events_endpoint)
            except BaseException:
                await self._web.cleanup()
                raise
        self.runner.start()
        self.metrics.update(self.engine.state())
        return self.port

    def _start_kv_events(self, endpoint: str) -> None:
        topic = self.config.kv_events_topic.format(
            address=self.address, name=self.name, model=self.config.served_names[0]
        )
        self.kv_events = KVEventPublisher(endpoint, topic, form=self.config.kv_events_form)
        self.kv_events.start()
        if self.engine.kv.events is None:
            self.engine.kv.events = EventLog()

    async def restart(self) -> None:
        """Imitate a process restart on the same addresses: the engine restarts (`Engine.restart`),
        the KV-event publisher is bound anew, its sequence numbers starting again from 0."""
        self.engine.restart()
        if self.kv_events is not None:
            endpoint = self.kv_events.endpoint
            await self.kv_events.aclose()
            if self.engine.kv.events is not None:
                self.engine.kv.events.drain()
            self._start_kv_events(endpoint)
        self.runner.wake()
        self._on_change()

    async def aclose(self) -> None:
        """Stop serving; in-flight requests finish with reason `abort`."""
        if self._closed:
            return
        self._closed = True
        await self.runner.aclose()
        if self._web is not None:
            await self._web.cleanup()
        if self.kv_events is not None:
            await self.kv_events.aclose()
        for _, fut in self._seen_waiters:
            if not fut.done():
                fut.cancel()
        for fut in self._idle_waiters:
            if not fut.done():
                fut.cancel()

    # -- test hooks ----------------------------------------------------------------------------
    async def requests_seen(self, n: int) -> None:
        """Return once this pod has received at least `n` inference requests."""
        if self.requests_received >= n:
            return
        fut = asyncio.get_running_loop().create_future()
        self._seen_waiters.append((n, fut))
        await fut

    async def idle(self) -> None:
        """Return once no request is waiting or running."""
        if not self.engine.waiting and not self.engine.running:
            return
        fut = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(fut)
        await fut

    def pause(self) -> None:
        """Freeze the engine (requests queue up, nothing progresses) until `resume()`."""
        self.runner.pause()

    def resume(self) -> None:
        """Let the engine run again."""
        self.runner.resume()

    def set_metrics(self, override: MetricsOverride | None) -> None:
        """Report fixed gauge values instead of the engine's (None restores them)."""
        self.metrics.set_override(override)
        self.metrics.update(self.engine.state())

    # -- runner callbacks ------------------------------------------------------------------------
    def note_request(self) -> None:
        """Count an inference request and wake `requests_seen` waiters."""
        self.requests_received += 1
        ready = [w for w in self._seen_waiters if w[0] <= self.requests_received]
        if ready:
            self._seen_waiters = [w for w in self._seen_waiters if w[0] > self.requests_received]
            for _, fut in ready:
                if not fut.done():
                    fut.set_result(None)

    def _on_step(self, out: StepOutput) -> None:
        c = self.engine.counters
        self.metrics.observe_step(out, c.preemptions, c.prefix_queries, c.prefix_hits)
        self.completed.extend(out.finished)

    def _on_change(self) -> None:
        self.metrics.update(self.engine.state())
        log = self.engine.kv.events
        if self.kv_events is not None and log is not None and log.events:
            self.kv_events.publish(log.drain())
        if self._idle_waiters and not self.engine.waiting and not self.engine.running:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)


def _offset(endpoint: str | None, i: int) -> str | None:
    """`tcp://host:port` with port + i (port 0 or `*`: unchanged, the OS chooses for each)."""
    if endpoint is None or i == 0:
        return endpoint
    head, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or int(port) == 0:
        return endpoint
    return f"{head}:{int(port) + i}"


class SimFleet:
    """N independent pods in this process, on consecutive ports (or each on port 0)."""

    def __init__(
        self,
        config: PodConfig | None = None,
        pods: int = 1,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name_prefix: str = "pod",
        configs: Sequence[PodConfig] | None = None,
    ) -> None:
        base = config or PodConfig()
        if configs is None:
            configs = [
                dataclasses.replace(
                    base, name=f"{name_prefix}-{i}", kv_events_endpoint=_offset(base.kv_events_endpoint, i)
                )
                for i in range(pods)
            ]
        self.pods = [SimPod(c) for c in configs]
        self._host = host
        self._port = port

    @property
    def addresses(self) -> list[str]:
        """`host:port` of every pod, in order."""
        return [p.address for p in self.pods]

    async def start(self) -> list[SimPod]:
        """Start every pod; on failure the ones already started are closed."""
        try:
            for i, pod in enumerate(self.pods):
                await pod.start(self._host, self._port + i if self._port else 0)
        except BaseException:
            await self.aclose()
            raise
        return self.pods

    async def aclose(self) -> None:
        """Close every pod (idempotent)."""
        for pod in self.pods:
            await pod.aclose()

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
