"""``epp serve --grpc-address unix:///…/epp.sock``: ext_proc and gRPC health on a Unix
socket beside the TCP ports (the sidecar shape), as a real process, and real Envoy
reaching epp over it with ``epp envoy-config --epp-address unix://…``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import stat
import subprocess

import aiohttp
import grpc
import orjson
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.envoy.process import EnvoyProcess

from support import MODELS
from support.messages import ExtProcClient, request_body, request_headers, set_headers
from support.serve import EPP, serving
from support.upstreams import Upstream

BODY = orjson.dumps({"model": "m", "prompt": "hi"})



async def _check(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


async def test_ext_proc_and_health_answer_on_the_socket_beside_tcp(write_pool, socket_dir):
    sock = socket_dir / "epp.sock"
    pool = write_pool(["127.0.0.1:8001", "127.0.0.1:8002"], models=MODELS)
    async with serving(pool, "--grpc-address", f"unix://{sock}", "--secure-serving=false") as served:
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o666  # Envoy's container runs under another uid
        async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
            for service in ("", "readiness", "liveness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                assert await _check(channel, service) == health_pb2.HealthCheckResponse.SERVING, service
            replies = await ExtProcClient(channel).run([request_headers(), request_body(BODY)])
            assert set_headers(replies[0])["x-gateway-destination-endpoint"] in {"127.0.0.1:8001", "127.0.0.1:8002"}
        async with grpc.aio.insecure_channel(served.address("grpc")) as channel:  # TCP still serves
            replies = await ExtProcClient(channel).run([request_headers(), request_body(BODY)])
            assert "x-gateway-destination-endpoint" in set_headers(replies[0])
        assert await served.stop() == 0
    assert not sock.exists()  # removed on the way out


async def test_the_socket_stays_plaintext_when_tcp_serves_tls(write_pool, socket_dir):
    sock = socket_dir / "epp.sock"
    async with serving(write_pool(["127.0.0.1:8001"], models=MODELS), "--grpc-address", f"unix://{sock}") as served:
        assert served.ready["tls"] is True
        async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
            replies = await ExtProcClient(channel).run([request_headers(), request_body(BODY)])
            assert set_headers(replies[0])["x-gateway-destination-endpoint"] == "127.0.0.1:8001"


async def test_a_stale_socket_file_is_replaced(write_pool, socket_dir):
    sock = socket_dir / "epp.sock"
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as stale:  # what a killed epp leaves behind
        stale.bind(str(sock))
    async with (
        serving(write_pool(["127.0.0.1:8001"]), "--grpc-address", f"unix://{sock}"),
        grpc.aio.insecure_channel(f"unix://{sock}") as channel,
    ):
        assert await _check(channel, "") == health_pb2.HealthCheckResponse.SERVING


BAD = [
    ("not-unix", "tcp://127.0.0.1:1", "expected unix:///path"),
    ("no-directory", "unix:///nonexistent-epp-dir/epp.sock", "does not exist"),
    ("regular-file", "REGULAR", "not a socket"),
]


@pytest.mark.parametrize(("address", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_socket_address_exits_2_with_one_line(write_pool, socket_dir, address, message):
    if address == "REGULAR":
        (socket_dir / "epp.sock").write_text("not a socket")
        address = f"unix://{socket_dir / 'epp.sock'}"
    out = subprocess.run(
        [*EPP, "serve", "--pool-file", str(write_pool(["127.0.0.1:8001"])), "--grpc-port", "0",
         "--grpc-health-port", "0", "--metrics-port", "0", "--bind-address", "127.0.0.1", "--grpc-address", address],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""  # no ready line
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("epp: ")]
    assert message in line


async def test_envoy_reaches_epp_over_the_socket(write_pool, socket_dir, tmp_path):
    sock = socket_dir / "epp.sock"
    pods = [await Upstream(f"pod-{i}").start() for i in range(2)]
    try:
        pool = write_pool([p.address for p in pods], models=MODELS)
        async with serving(pool, "--grpc-address", f"unix://{sock}", "--secure-serving=false"):
            proc = await asyncio.create_subprocess_exec(
                *EPP, "envoy-config", "--pool-file", str(pool), "--listen-port", "0",
                "--epp-address", f"unix://{sock}", stdout=asyncio.subprocess.PIPE)  # fmt: skip
            text, _ = await proc.communicate()
            assert proc.returncode == 0
            config = yaml.safe_load(text)
            (epp,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "epp"]
            (endpoint,) = epp["load_assignment"]["endpoints"][0]["lb_endpoints"]
            assert endpoint["endpoint"]["address"] == {"pipe": {"path": str(sock)}}
            async with EnvoyProcess(config, workdir=tmp_path / "envoy") as envoy:
                url = "http://" + await envoy.listener_address()
                async with aiohttp.ClientSession() as http:
                    for i in range(4):
                        async with http.post(url + "/v1/completions", data=orjson.dumps(
                                {"model": "m", "prompt": f"p{i}"})) as r:
                            assert r.status == 200
                            name = r.headers["x-served-by"]
                        (pod,) = [p for p in pods if p.name == name]
                        assert pod.seen[-1].headers["x-gateway-destination-endpoint"] == pod.address
                stats = await envoy.stats(r"cluster\.epp\.upstream_cx_total")
                assert stats["cluster.epp.upstream_cx_total"] >= 1
    finally:
        for p in pods:
            await p.aclose()
