"""Faults that need ``epp serve`` as a separate process, with real Envoy in front and a
client sending requests all the time: epp SIGKILLed and restarted (FailClose and FailOpen),
and SIGTERM with requests held in flight.

The epp address Envoy dials is fixed once its bootstrap is rendered, so the restarted epp
listens on the first one's ext_proc port (read from its ready line): the one place a known
port is reused.  A second ``epp serve`` waits only for its own ready line; Envoy's reconnect
is awaited through what the client sees.  ``epp serve`` offers nothing to await for its
in-flight count, so that one is a bounded poll of its ``/metrics``.
"""

from __future__ import annotations

import asyncio
import collections
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.config import load_pool_file
from epp.envoy.config import render_bootstrap
from epp.envoy.process import EnvoyProcess

from support import MODELS, pool_doc, write_yaml
from support.serve import Serving, start_epp_serve
from support.upstreams import Upstream, wait_for_arrivals

COMPLETION = {"model": "m", "prompt": "Say hello", "max_tokens": 3}


@dataclass
class Load:
    """Clients posting completions through Envoy back to back; every answer is counted
    under the phase that was current when it came back (0 = no HTTP answer at all)."""

    url: str
    phase: str = "before"
    statuses: dict[str, collections.Counter[int]] = field(default_factory=lambda: collections.defaultdict(
        collections.Counter))
    order: list[tuple[str, int]] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _client(self, http: aiohttp.ClientSession, k: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                async with http.post(self.url + "/v1/completions",
                                     data=orjson.dumps({**COMPLETION, "prompt": f"client {k} #{i}"}),
                                     headers={"content-type": "application/json"}) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            async with self._changed:
                self.statuses[self.phase][status] += 1
                self.order.append((self.phase, status))
                self._changed.notify_all()
            if status != 200:  # pacing, not synchronisation: a fast 5xx loop would only burn the 2 cores
                await asyncio.sleep(0.01)

    async def wait(self, predicate: Callable[[Load], bool], timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    def count(self, phase: str, ok: bool | None = None) -> int:
        c = self.statuses[phase]
        return sum(n for s, n in c.items() if ok is None or (s == 200) == ok)

    @asynccontextmanager
    async def running(self, clients: int = 2) -> AsyncIterator[Load]:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            tasks = [asyncio.create_task(self._client(http, k)) for k in range(clients)]
            try:
                yield self
            finally:
                self._stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 15)


@dataclass
class Stack:
    envoy: EnvoyProcess
    url: str
    pool_file: Path
    pods: list[Upstream]


@asynccontextmanager
async def envoy_before(tmp_path: Path, epp_port: int, failure_mode: str, body_mode: str,
                       pods: list[Upstream]) -> AsyncIterator[Stack]:
    pool_file = write_yaml(tmp_path / "pool.yaml",
                           pool_doc([p.address for p in pods], models=MODELS, failure_mode=failure_mode))
    config = render_bootstrap(load_pool_file(pool_file), listen_port=0, epp_address=f"127.0.0.1:{epp_port}",
                              body_mode=body_mode)  # type: ignore[arg-type]
    envoy = EnvoyProcess(config)
    await envoy.start()
    try:
        yield Stack(envoy, "http://" + await envoy.listener_address(), pool_file, pods)
    finally:
        await envoy.aclose()


@pytest.fixture
async def pods() -> AsyncIterator[list[Upstream]]:
    made = [await Upstream(f"pod-{i}").start() for i in range(2)]
    yield made
    for p in made:
        if p.hold is not None:
            p.hold.set()
        await p.aclose()


def write_pool(tmp_path: Path, pods: list[Upstream], failure_mode: str) -> Path:
    return write_yaml(tmp_path / "epp-pool.yaml",
                      pool_doc([p.address for p in pods], models=MODELS, failure_mode=failure_mode))


EPP_ARGS = ("--secure-serving=false", "--log-level", "warning")


async def restart_on(port: int, pool_file: Path, *extra: str, attempts: int = 5) -> Serving:
    """``epp serve`` again on ext_proc port ``port``; a start that loses the port (still held
    by the kernel for the dead process) exits before its ready line and is tried again."""
    for attempt in range(attempts):
        try:
            return await start_epp_serve("--pool-file", str(pool_file), *EPP_ARGS, "--grpc-port", str(port), *extra)
        except AssertionError:  # exited before its ready line (port in use)
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


async def metric_sum(served: Serving, name: str) -> float:
    """The sum of every sample of ``name`` on epp's own ``/metrics``."""
    async with aiohttp.ClientSession() as http, http.get(f"http://{served.address('metrics')}/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


async def until_metric(served: Serving, name: str, ok: Callable[[float], bool], timeout: float = 10.0) -> float:
    """Bounded poll of a foreign process's metric (``epp serve`` offers nothing to await)."""
    async with asyncio.timeout(timeout):
        while True:
            if ok(v := await metric_sum(served, name)):
                return v
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(("failure_mode", "body_mode"), [("FailClose", "full-duplex"), ("FailOpen", "buffered")])
async def test_epp_sigkilled_and_restarted_under_load(tmp_path, pods, failure_mode, body_mode):
    pool_file = write_pool(tmp_path, pods, failure_mode)
    first = await start_epp_serve("--pool-file", str(pool_file), *EPP_ARGS)
    second: Serving | None = None
    try:
        port = first.ready["grpc_port"]
        async with envoy_before(tmp_path, port, failure_mode, body_mode, pods) as stack, \
                Load(stack.url).running() as load:
            await load.wait(lambda ld: ld.count("before", ok=True) >= 10)
            load.phase = "outage"
            first.proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(first.proc.wait(), 10) == -signal.SIGKILL
            await load.wait(lambda ld: ld.count("outage") >= 10)
            load.phase = "restarting"
            second = await restart_on(port, pool_file)
            load.phase = "after"
            # once Envoy has reconnected to the new epp (its first 200 through it), only 200s
            await load.wait(lambda ld: ld.count("after", ok=True) >= 1)
            load.phase = "back"
            await load.wait(lambda ld: ld.count("back") >= 20)
            routed = await until_metric(second, "inference_model_request_total", lambda v: v >= 1)
        # (load stopped: every client has its answer)
        before, outage, back = load.statuses["before"], load.statuses["outage"], load.statuses["back"]
        print(f"\n{failure_mode}: before {dict(before)}, outage {dict(outage)}, "
              f"restarting {dict(load.statuses['restarting'])}, after {dict(load.statuses['after'])}, "
              f"back {dict(back)}; the new epp routed {routed:.0f}")
        assert set(before) == {200}
        if failure_mode == "FailClose":
            # a request already past epp when it died may still finish: at most one per client
            assert load.count("outage", ok=False) >= 8 and all(500 <= s < 600 for s in outage if s != 200)
            assert outage[200] <= 2
        else:
            assert set(outage) == {200}  # Envoy routes without epp
            assert set(load.statuses["restarting"]) <= {200} and set(load.statuses["after"]) == {200}
        assert set(back) == {200}, back
        assert routed >= 1  # the new epp is in the path again
        await until_metric(second, "inference_pool_per_pod_inflight_requests", lambda v: v == 0)
        await until_metric(second, "epp_extproc_streams", lambda v: v == 0)
    finally:
        await first.kill()
        if second is not None:
            assert await second.stop() == 0


async def test_sigterm_under_envoy_finishes_held_requests_refuses_new_ones_and_exits_zero(tmp_path, pods):
    # test_serve_process.py drains one raw ext_proc stream; here the streams are Envoy's,
    # the requests are real HTTP ones held at the pods, and new requests keep coming.
    pool_file = write_pool(tmp_path, pods, "FailClose")
    served = await start_epp_serve("--pool-file", str(pool_file), *EPP_ARGS, "--drain-timeout", "15s")
    try:
        async with envoy_before(tmp_path, served.ready["grpc_port"], "FailClose", "full-duplex", pods) as stack, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http, \
                grpc.aio.insecure_channel(served.address("health")) as hch:
            hold = asyncio.Event()
            for p in pods:
                p.hold = hold

            async def post(i: int) -> tuple[int, bytes]:
                async with http.post(stack.url + "/v1/completions",
                                     data=orjson.dumps({**COMPLETION, "prompt": f"held {i}"}),
                                     headers={"content-type": "application/json"}) as r:
                    return r.status, await r.read()

            held = [asyncio.create_task(post(i)) for i in range(4)]
            await wait_for_arrivals(pods, 4)
            assert await until_metric(served, "epp_extproc_streams", lambda v: v == 4) == 4

            served.proc.send_signal(signal.SIGTERM)
            watch = health_pb2_grpc.HealthStub(hch).Watch(health_pb2.HealthCheckRequest(service="readiness"))
            async with asyncio.timeout(10):
                async for update in watch:
                    if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
            watch.cancel()
            # draining: a new request's ext_proc stream is refused, FailClose answers 5xx
            refused = [await post(100 + i) for i in range(3)]
            assert all(500 <= s < 600 for s, _ in refused), refused
            assert served.proc.returncode is None  # still draining: four streams are open
            assert sum(len(p.seen) for p in pods) == 4  # the refused ones never reached a pod

            hold.set()
            done = await asyncio.wait_for(asyncio.gather(*held), 10)
            assert [s for s, _ in done] == [200] * 4
            assert all(orjson.loads(b)["model"] == "m" for _, b in done)  # epp still processed the responses
            assert await asyncio.wait_for(served.proc.wait(), 15) == 0  # within --drain-timeout
    finally:
        await served.kill()
