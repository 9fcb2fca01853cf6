"""`epp serve` as a real process: the readiness contract, SIGTERM drain, TLS, exit codes,
and the envoy-config command."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import grpc
import orjson
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support import pool_doc, write_yaml
from support.messages import (
    ExtProcClient,
    request_body,
    request_headers,
    response_body,
    response_headers,
    set_headers,
)
from support.serve import EPP, READY_KEYS, serving, start_serve


async def test_ready_line_is_the_one_stdout_line_and_every_port_it_names_answers(write_pool):
    pool = write_pool(["127.0.0.1:18001", "127.0.0.1:18002"], mirror=["127.0.0.1:18101"])
    served = await start_serve(pool, "--secure-serving=false")
    try:
        ready = served.ready
        assert set(ready) == READY_KEYS
        assert (ready["event"], ready["discovery"], ready["pool"], ready["endpoints"], ready["tls"]) == (
            "ready", "file", "test-pool", 2, False)
        ports = [ready["grpc_port"], ready["health_port"], ready["metrics_port"]]
        assert all(isinstance(p, int) and p > 0 for p in ports) and len(set(ports)) == 3
        # every port is bound and serving the moment the line appears: no retry, no wait
        async with grpc.aio.insecure_channel(served.address("health")) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="readiness"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        async with aiohttp.ClientSession() as http, http.get(f"http://{served.address('metrics')}/metrics") as r:
            assert r.status == 200 and 'inference_pool_ready_pods{name="test-pool"}' in await r.text()
        async with grpc.aio.insecure_channel(served.address("grpc")) as ch:
            (reply,) = await ExtProcClient(ch).run([request_headers(method="GET", end_of_stream=True)])
        assert set_headers(reply)["x-gateway-destination-endpoint"] in ("127.0.0.1:18001", "127.0.0.1:18002")
        assert await served.stop() == 0
        assert served.proc.stdout is not None
        assert await served.proc.stdout.read() == b""  # exactly one line on stdout, all the way to the exit
    finally:
        await served.kill()


async def test_sigterm_drains_open_streams_then_exits_zero(write_pool):
    async with serving(write_pool(["127.0.0.1:18001"]), "--secure-serving=false", "--drain-timeout", "20s") as served:
        proc = served.proc
        async with grpc.aio.insecure_channel(served.address("grpc")) as ch, \
                grpc.aio.insecure_channel(served.address("health")) as hch:
            client = ExtProcClient(ch)
            call = client.open()
            await call.write(request_headers())
            replies = await client.send(call, request_body(orjson.dumps({"model": "m", "prompt": "p"})), 2)
            assert set_headers(replies[0])["x-gateway-destination-endpoint"] == "127.0.0.1:18001"
            proc.send_signal(signal.SIGTERM)
            watch = health_pb2_grpc.HealthStub(hch).Watch(health_pb2.HealthCheckRequest(service="readiness"))
            async with asyncio.timeout(10):  # readiness flips first, so the Service stops sending us streams
                async for update in watch:
                    if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
            watch.cancel()
            with pytest.raises(grpc.aio.AioRpcError):  # no new streams while draining
                await ExtProcClient(ch).run([request_headers(method="GET", end_of_stream=True)])
            assert proc.returncode is None  # still draining: our stream is open
            # the in-flight request finishes normally
            await client.send(call, response_headers(200), 1)
            (r,) = await client.send(call, response_body(b"{}", True), 1)
            assert r.response_body.response.body_mutation.streamed_response.end_of_stream
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_self_signed_tls_by_default(write_pool):
    async with serving(write_pool(["127.0.0.1:18001"])) as served:
        assert served.ready["tls"] is True
        creds = grpc.ssl_channel_credentials()
        # verification fails against a self-signed cert: proves TLS is on; Envoy skips verification
        async with grpc.aio.secure_channel(served.address("grpc"), creds) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await ExtProcClient(ch).run([request_headers(method="GET", end_of_stream=True)])
        async with grpc.aio.insecure_channel(served.address("grpc")) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await ExtProcClient(ch).run([request_headers(method="GET", end_of_stream=True)])
        assert await served.stop() == 0


async def test_bad_pool_file_exits_2_with_one_line_and_no_ready_line(tmp_path):
    bad = write_yaml(tmp_path / "pool.yaml", pool_doc(["127.0.0.1"]))  # no port: invalid before anything is dialled
    proc = await asyncio.create_subprocess_exec(*EPP, "serve", "--pool-file", str(bad),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2 and out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "pool.endpoints" in lines[0] and "host:port" in lines[0]


async def test_envoy_config_command_writes_a_bootstrap_envoy_accepts(write_pool, tmp_path):
    from epp.envoy.process import validate

    out = tmp_path / "envoy.yaml"
    pool = write_pool(["127.0.0.1:18001"], mirror=["127.0.0.1:18101"])
    proc = await asyncio.create_subprocess_exec(
        *EPP, "envoy-config", "--pool-file", str(pool), "--listen-port", "10000", "--epp-address",
        "127.0.0.1:9002", "--body-mode", "buffered", "--lb", "original-dst", "--epp-tls", "-o", str(out))
    assert await proc.wait() == 0
    doc = yaml.safe_load(out.read_text())
    text = out.read_text()
    assert "ORIGINAL_DST" in text and "BUFFERED" in text and "request_mirror_policies" in text
    await validate(doc)


async def test_a_port_in_use_is_one_epp_line_and_exit_2(write_pool):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            *EPP, "serve", "--pool-file", str(write_pool(["127.0.0.1:18001"])), "--grpc-port", "0",
            "--grpc-health-port", "0", "--metrics-port", str(port), "--bind-address", "127.0.0.1",
            "--secure-serving=false", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
    assert proc.returncode == 2 and out == b""  # no ready line
    epp_lines = [line for line in err.decode().splitlines() if line.startswith("epp:")]
    assert len(epp_lines) == 1 and f":{port} (metrics)" in epp_lines[0] and "Traceback" not in err.decode()
