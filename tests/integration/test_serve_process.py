"""`epp serve` as a real process: start-up line, SIGTERM drain, exit codes, envoy-config CLI."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import grpc
import orjson
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ExtProcClient
from messages import request_body, request_headers, response_body, response_headers, set_headers

EPP = [sys.executable, "-m", "epp"]
STARTED = re.compile(rb"ext_proc :(\d+) \((\w+)\), health :(\d+), metrics :(\d+)")


async def start_serve(pool: Path, *extra: str) -> tuple[asyncio.subprocess.Process, dict[str, int]]:
    proc = await asyncio.create_subprocess_exec(
        *EPP, "serve", "--pool-file", str(pool), "--grpc-port", "0", "--grpc-health-port", "0",
        "--metrics-port", "0", "--bind-address", "127.0.0.1", *extra,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        while True:
            line = await proc.stderr.readline()
            assert line, "epp exited before it started serving"
            if m := STARTED.search(line):
                ports = {"grpc": int(m[1]), "health": int(m[3]), "metrics": int(m[4])}
                return proc, ports


async def test_sigterm_drains_open_streams_then_exits_zero(write_pool):
    proc, ports = await start_serve(write_pool(["127.0.0.1:18001"]), "--secure-serving=false", "--drain-timeout", "20s")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}") as ch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{ports['health']}") as hch:
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
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_self_signed_tls_by_default(write_pool):
    proc, ports = await start_serve(write_pool(["127.0.0.1:18001"]))
    try:
        creds = grpc.ssl_channel_credentials()
        # verification fails against a self-signed cert: proves TLS is on; Envoy skips verification
        async with grpc.aio.secure_channel(f"127.0.0.1:{ports['grpc']}", creds) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await ExtProcClient(ch).run([request_headers(method="GET", end_of_stream=True)])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}") as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await ExtProcClient(ch).run([request_headers(method="GET", end_of_stream=True)])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_bad_pool_file_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "pool.yaml"
    bad.write_text(yaml.safe_dump({"pool": {"name": "p", "endpoints": ["1.2.3.4"]}}))
    proc = await asyncio.create_subprocess_exec(*EPP, "serve", "--pool-file", str(bad),
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 2
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
