"""``epp serve --workers 2`` as a real process: one ready line for both workers, the kernel
spreading connections over them (SO_REUSEPORT on one port), each worker's in-flight claims
in the other's scheduling view (the peer exchange over ipc://), SIGTERM drain, exit codes.

Each gRPC channel here is its own TCP connection (``grpc.use_local_subchannel_pool``: grpc
would otherwise share one connection between channels to the same address).  Which worker
a connection reaches is the kernel's choice; a test learns it from the workers' own
``/metrics`` (``epp_extproc_streams``: open streams) while a stream is open.  Observing the
other process's view is a poll of its ``/metrics`` with a deadline; nothing sleeps to wait.
Scraping is off and the endpoints are addresses nothing listens on (never dialled).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp.config import load_pool_file
from epp.envoy.config import render_bootstrap
from epp.envoy.process import EnvoyProcess

from support import pool_doc, write_yaml
from support.messages import ExtProcClient, request_body, request_headers, response_body, response_headers, set_headers
from support.serve import EPP, READY_KEYS, Serving, start_serve
from support.upstreams import Upstream, wait_for_arrivals

PODS = ["127.0.0.1:18001", "127.0.0.1:18002"]
NAMES = {"127.0.0.1:18001": "test-pool-0", "127.0.0.1:18002": "test-pool-1"}
DEADLINE = 10.0
COMMON = ("--workers", "2", "--secure-serving=false", "--refresh-metrics-interval", "0",
          "--scheduling-profile", "least-inflight")  # fmt: skip
BODY = orjson.dumps({"model": "m", "prompt": "p"})


def channel(served: Serving) -> grpc.aio.Channel:
    """A channel with its own connection (not grpc's shared subchannel)."""
    return grpc.aio.insecure_channel(served.address("grpc"), options=[("grpc.use_local_subchannel_pool", 1)])


async def scrape(http: aiohttp.ClientSession, port: int) -> dict[tuple[str, str], float]:
    """One worker's /metrics: (metric, pod label or "") → value."""
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, sample.labels.get("model_server_pod", ""))] = sample.value
    return out


async def routed_per_worker(http: aiohttp.ClientSession, served: Serving) -> list[float]:
    """``inference_model_request_total`` (all labels) of each worker, in worker order."""
    out = []
    for port in served.ready["worker_metrics_ports"]:
        page = await scrape(http, port)
        out.append(sum(v for (name, _), v in page.items() if name == "inference_model_request_total"))
    return out


async def open_streams(http: aiohttp.ClientSession, ports: list[int]) -> list[float]:
    return [(await scrape(http, p)).get(("epp_extproc_streams", ""), 0.0) for p in ports]


async def poll(check: Callable[[], Any], what: str) -> None:
    """Until ``await check()`` is true: another process's state, so a bounded poll."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DEADLINE):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.02)  # the poll's pace, not synchronisation: the deadline bounds it
    raise AssertionError(f"not within {DEADLINE} s: {what}")


async def route(client: ExtProcClient) -> tuple[Any, str]:
    """Open a stream, send headers and body; the open call and the picked endpoint."""
    call = client.open()
    await call.write(request_headers())
    replies = await client.send(call, request_body(BODY), 2)
    return call, set_headers(replies[0])["x-gateway-destination-endpoint"]


async def finish(client: ExtProcClient, call: Any) -> None:
    """The rest of the request, normally: response headers and body, then the stream's end."""
    await client.send(call, response_headers(200), 1)
    (r,) = await client.send(call, response_body(b"{}", True), 1)
    assert r.response_body.response.body_mutation.streamed_response.end_of_stream
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF


@asynccontextmanager
async def workers(write_pool: Callable[..., Any], *extra: str) -> AsyncIterator[Serving]:
    """``epp serve --workers 2``; on the way out, killed unless stopped, and stdout read to its end
    (the workers hold the parent's stdout too: it ends when the last process does)."""
    served = await start_serve(write_pool(PODS), *COMMON, *extra)
    try:
        yield served
    finally:
        await served.kill()
        assert served.proc.stdout is not None
        rest = await asyncio.wait_for(served.proc.stdout.read(), DEADLINE)
    assert rest == b"", rest  # the ready line was the only line


async def channels_per_worker(served: Serving, http: aiohttp.ClientSession) -> list[grpc.aio.Channel]:
    """One channel (connection) per worker: connections are opened until each worker has one."""
    ports = served.ready["worker_metrics_ports"]
    found: dict[int, grpc.aio.Channel] = {}
    spare = []
    for _ in range(64):  # the kernel hashes each connection to a worker: 64 all on one has odds 2^-63
        ch = channel(served)
        client = ExtProcClient(ch)
        call, _ = await route(client)
        counts = await open_streams(http, ports)  # the gauge moved before the reply was sent
        assert sorted(counts) == [0.0, 1.0], counts
        worker = counts.index(1.0)
        await finish(client, call)
        if worker in found:
            spare.append(ch)
        else:
            found[worker] = ch
        if len(found) == len(ports):
            break
    for ch in spare:
        await ch.close()
    assert sorted(found) == [0, 1], "every connection reached the same worker"
    return [found[0], found[1]]


async def test_one_ready_line_names_both_workers_and_streams_reach_both(write_pool):
    async with workers(write_pool) as served, aiohttp.ClientSession() as http:
        ready = served.ready
        assert set(ready) == READY_KEYS | {"workers", "worker_pids", "worker_metrics_ports"}
        assert ready["workers"] == 2 and ready["discovery"] == "file" and ready["endpoints"] == 2
        pids, ports = ready["worker_pids"], ready["worker_metrics_ports"]
        assert len(set(pids)) == 2 and served.proc.pid not in pids
        assert ready["metrics_port"] == ports[0] and len(set(ports)) == 2
        chans = await channels_per_worker(served, http)
        try:
            totals = await routed_per_worker(http, served)  # each worker counted what it routed
            assert all(t >= 1 for t in totals), totals
        finally:
            for ch in chans:
                await ch.close()
        assert await served.stop() == 0


async def test_a_workers_claims_are_in_its_siblings_scheduling_view(write_pool):
    async with workers(write_pool) as served, aiohttp.ClientSession() as http:
        port_a, port_b = served.ready["worker_metrics_ports"]
        chan_a, chan_b = await channels_per_worker(served, http)
        a, b = ExtProcClient(chan_a), ExtProcClient(chan_b)
        try:
            held = [await route(a) for _ in range(3)]  # worker A: least-inflight spreads 3 as 2 + 1
            picks = [pick for _, pick in held]
            lighter = min(PODS, key=picks.count)
            assert sorted(picks.count(p) for p in PODS) == [1, 2]
            own_a = await scrape(http, port_a)
            assert [own_a[("inference_pool_per_pod_inflight_requests", NAMES[p])] for p in PODS] == [
                picks.count(p) for p in PODS]  # fmt: skip

            async def b_sees_a() -> bool:
                view = await scrape(http, port_b)
                return all(view[("epp_peer_inflight_requests", NAMES[p])] == picks.count(p) for p in PODS)

            await poll(b_sees_a, "worker B's peer view holds A's three claims")
            b_own = await scrape(http, port_b)
            assert all(b_own[("inference_pool_per_pod_inflight_requests", NAMES[p])] == 0 for p in PODS)
            call_b, pick_b = await route(b)  # B itself has nothing in flight: only A's claims tell it
            assert pick_b == lighter

            async def a_sees_b() -> bool:
                view = await scrape(http, port_a)
                return view[("epp_peer_inflight_requests", NAMES[lighter])] == 1

            await poll(a_sees_b, "worker A's peer view holds B's claim")
            for call, _ in held:
                await finish(a, call)
            await finish(b, call_b)

            async def released() -> bool:
                views = [await scrape(http, p) for p in (port_a, port_b)]
                return all(
                    v[(name, NAMES[p])] == 0
                    for v in views
                    for p in PODS
                    for name in ("epp_peer_inflight_requests", "inference_pool_per_pod_inflight_requests")
                )

            await poll(released, "every claim released, in both views")
        finally:
            await chan_a.close()
            await chan_b.close()
        assert await served.stop() == 0


async def test_sigterm_drains_every_worker_then_exits_zero(write_pool):
    async with workers(write_pool, "--drain-timeout", "20s") as served, aiohttp.ClientSession() as http:
        chans = await channels_per_worker(served, http)
        clients = [ExtProcClient(ch) for ch in chans]
        try:
            calls = [(await route(c))[0] for c in clients]  # one open stream in each worker
            served.proc.send_signal(signal.SIGTERM)

            async def refused() -> bool:  # both workers closed their listener: a new connection is refused
                async with channel(served) as ch:
                    try:
                        await ExtProcClient(ch).run([request_headers(method="GET", end_of_stream=True)])
                    except grpc.aio.AioRpcError as exc:
                        return bool(exc.code() == grpc.StatusCode.UNAVAILABLE)
                return False

            await poll(refused, "no worker takes a new connection")
            assert served.proc.returncode is None  # still draining: our streams are open
            for client, call in zip(clients, calls, strict=True):
                await finish(client, call)  # the in-flight requests finish normally
        finally:
            for ch in chans:
                await ch.close()
        assert await asyncio.wait_for(served.proc.wait(), 20) == 0


async def test_a_bad_pool_file_exits_2_before_any_worker_binds(tmp_path):
    bad = write_yaml(tmp_path / "pool.yaml", pool_doc(["127.0.0.1"]))  # no port: invalid
    with socket.socket() as taken:  # had a worker tried to bind, its error would be this port's
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            *EPP, "serve", "--pool-file", str(bad), "--workers", "2", "--grpc-port", str(port),
            "--grpc-health-port", "0", "--metrics-port", "0", "--bind-address", "127.0.0.1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2 and out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "pool.endpoints" in lines[0] and "host:port" in lines[0]


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (("--grpc-address", "unix:///tmp/epp-workers-test.sock"), "one Unix socket file"),
        (("--kv-events-bind", "tcp://127.0.0.1:0"), "--kv-events-bind"),
        (("--workers", "0"), "at least 1"),
    ],
    ids=["unix-socket", "kv-events-bind", "zero"],
)
async def test_what_workers_cannot_share_is_a_config_error(write_pool, flag, message):
    proc = await asyncio.create_subprocess_exec(
        *EPP, "serve", "--pool-file", str(write_pool(PODS)), "--workers", "2", *flag,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2 and out == b"" and message in err.decode()


@pytest.mark.parametrize(("cap", "connections"), [(None, 1), (2, 4)], ids=["no-cap", "cap-2"])
async def test_envoy_opens_more_connections_to_epp_only_with_a_stream_cap(write_pool, tmp_path, cap, connections):
    """Real Envoy (one worker thread) in front of ``epp serve --workers 2``: without
    ``--ext-proc-max-concurrent-streams`` every ext_proc stream shares one HTTP/2 connection,
    so one worker serves them all; with a cap of 2 and 8 requests held open at once, Envoy
    opens 4 connections, which the kernel spreads over the workers."""
    hold = asyncio.Event()
    ups = [await Upstream(f"pod-{i}", hold=hold).start() for i in range(2)]
    pool = write_yaml(tmp_path / "pool.yaml", pool_doc([u.address for u in ups]))
    served = await start_serve(pool, *COMMON)
    config = render_bootstrap(load_pool_file(pool), listen_port=0, epp_address=served.address("grpc"),
                              ext_proc_max_concurrent_streams=cap)  # fmt: skip
    envoy = EnvoyProcess(config, extra_args=("--concurrency", "1"))
    try:
        await envoy.start()
        url = f"http://{await envoy.listener_address()}/v1/completions"
        async with aiohttp.ClientSession() as http:

            async def post() -> int:
                async with http.post(url, json={"model": "m", "prompt": "hi", "max_tokens": 1}) as r:
                    return r.status

            posts = [asyncio.ensure_future(post()) for _ in range(8)]
            await wait_for_arrivals(ups, 8, method="POST")  # all 8 ext_proc streams open at once
            stats = await envoy.stats(r"cluster\.epp\.upstream_cx_total$")
            hold.set()
            assert await asyncio.gather(*posts) == [200] * 8
            totals = await routed_per_worker(http, served)
        assert stats["cluster.epp.upstream_cx_total"] == connections
        assert sum(totals) == 8
        if cap is None:
            assert sorted(totals) == [0, 8]  # one connection: one worker
    finally:
        hold.set()
        await envoy.aclose()
        assert await served.stop() == 0
        assert served.proc.stdout is not None and await served.proc.stdout.read() == b""
        for u in ups:
            await u.aclose()
