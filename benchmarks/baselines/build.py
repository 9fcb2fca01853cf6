"""Build the Go floor once (cached), and check that both floors answer the same.

``floor_go_binary()`` builds ``floor_go/`` (go-control-plane + grpc-go) with the local Go
toolchain and caches the binary under ``~/.cache/epp/floor-go/<hash of the sources>/floor-go``,
so an edit of ``main.go``, ``go.mod`` or ``go.sum`` builds a new one and an unchanged tree
never builds twice.  ``floor_commands()`` gives the argv of either floor.

    python benchmarks/baselines/build.py             # builds if needed, prints the binary's path
    python benchmarks/baselines/build.py --selftest  # also drives both floors over real gRPC

``--selftest`` starts each floor as a process on port 0 (waiting for its ready line), drives
a headers-only, a BUFFERED and a FULL_DUPLEX_STREAMED stream with grpc.aio, checks every
reply against what Envoy needs, and checks that the Go and Python floors sent exactly the
same replies.  Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.run import cached_binary, epp_cache, find_go, run_echoing

__all__ = ["FLOOR_PY", "SOURCES", "BuildFailed", "floor_commands", "floor_go_binary"]

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "floor_go"
FLOOR_PY = HERE / "floor_py.py"
BUILD_TIMEOUT_S = 900.0  # cold: downloads go-control-plane and grpc-go, then compiles them on 2 cores
_SOURCE_FILES = ("go.mod", "go.sum", "main.go")


class BuildFailed(RuntimeError):
    pass


def _say(message: str) -> None:
    print(f"[floor-go] {message}", file=sys.stderr, flush=True)


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in _SOURCE_FILES:
        digest.update(name.encode() + b"\0" + (SOURCES / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def floor_go_binary() -> Path:
    """The cached floor-go binary for the current sources, built on first use."""
    return cached_binary(epp_cache("floor-go", source_hash()), "floor-go", _build)


def _build(binary: Path) -> None:
    go, started = find_go(), time.monotonic()
    _say(f"building {SOURCES} into {binary.parent} (once per source change)")
    partial = binary.with_suffix(".partial")
    cmd = [go, "build", "-trimpath", "-mod=readonly", "-buildvcs=false", "-o", str(partial), "."]
    env = {**os.environ, "GO111MODULE": "on", "CGO_ENABLED": "0"}
    ran = run_echoing(cmd, cwd=SOURCES, env=env, deadline=started + BUILD_TIMEOUT_S, label="floor-go")
    if ran.returncode != 0 or ran.timed_out:
        raise BuildFailed(f"go build failed (rc={ran.returncode}, timed out: {ran.timed_out}):\n{ran.describe()}")
    partial.rename(binary)  # atomic: a reader never sees a half-written binary
    _say(f"built {binary} in {time.monotonic() - started:.0f}s")


def floor_commands(address: str, endpoints: Sequence[str]) -> dict[str, list[str]]:
    """``{"floor-go": argv, "floor-py": argv}``: both take the same CLI and print the same ready line."""
    args = ["--address", address, "--endpoints", ",".join(endpoints)]
    return {
        "floor-go": [str(floor_go_binary()), *args],
        "floor-py": [sys.executable, str(FLOOR_PY), *args],
    }


# ---- --selftest ---------------------------------------------------------------------------

ENDPOINTS = ("127.0.0.1:18001", "127.0.0.2:18002", "127.0.0.3:18003")  # only named in replies, never contacted
DESTINATION = "x-gateway-destination-endpoint"
BIG_BODY = b'{"model":"m","prompt":"' + b"x" * 100_000 + b'"}'  # two streamed_response chunks back


def _messages() -> Any:
    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as mode_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    def headers(pairs: dict[str, str], end_of_stream: bool) -> Any:
        hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])
        return pb.HttpHeaders(headers=hm, end_of_stream=end_of_stream)

    def config(request_mode: int, response_mode: int) -> Any:
        return pb.ProtocolConfiguration(request_body_mode=request_mode, response_body_mode=response_mode)

    return pb, mode_pb2.ProcessingMode, headers, config


def _plain(response: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(response)


def _destination(reply: dict[str, Any], phase: str) -> dict[str, str]:
    common = reply.get(phase, {}).get("response", {})
    import base64

    return {
        h["header"]["key"]: base64.b64decode(h["header"]["rawValue"]).decode()
        for h in common.get("headerMutation", {}).get("setHeaders", [])
    }


async def _drive(port: int) -> dict[str, list[dict[str, Any]]]:
    """The three streams against one floor; the replies of each, as plain dicts."""
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    pb, mode, headers, config = _messages()
    request_headers = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}
    replies: dict[str, list[dict[str, Any]]] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)

        # 1. headers only (a GET): one reply, the destination on the headers
        call = stub.Process()
        await call.write(pb.ProcessingRequest(
            request_headers=headers({":method": "GET", ":path": "/v1/models"}, True),
            protocol_config=config(mode.BUFFERED, mode.NONE),
        ))  # fmt: skip
        out = [_plain(await call.read())]
        await call.done_writing()
        out += [_plain(m) async for m in _rest(call)]
        replies["headers-only"] = out

        # 2. BUFFERED ping-pong, as Envoy drives it: one reply per message
        call = stub.Process()
        out = []
        for message in (
            pb.ProcessingRequest(request_headers=headers(request_headers, False),
                                 protocol_config=config(mode.BUFFERED, mode.BUFFERED)),
            pb.ProcessingRequest(request_body=pb.HttpBody(body=b'{"model":"m"}', end_of_stream=True)),
            pb.ProcessingRequest(response_headers=headers({":status": "200"}, False)),
            pb.ProcessingRequest(response_body=pb.HttpBody(body=b'{"ok":1}', end_of_stream=True)),
        ):  # fmt: skip
            await call.write(message)
            out.append(_plain(await call.read()))
        await call.done_writing()
        out += [_plain(m) async for m in _rest(call)]
        replies["buffered"] = out

        # 3. FULL_DUPLEX_STREAMED both ways: everything written up front, as Envoy may
        call = stub.Process()
        half = len(BIG_BODY) // 2
        for message in (
            pb.ProcessingRequest(request_headers=headers(request_headers, False),
                                 protocol_config=config(mode.FULL_DUPLEX_STREAMED, mode.FULL_DUPLEX_STREAMED)),
            pb.ProcessingRequest(request_body=pb.HttpBody(body=BIG_BODY[:half], end_of_stream=False)),
            pb.ProcessingRequest(request_body=pb.HttpBody(body=BIG_BODY[half:], end_of_stream=True)),
            pb.ProcessingRequest(response_headers=headers({":status": "200"}, False)),
            *(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: %d\n\n" % i, end_of_stream=False))
              for i in range(3)),
            pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True)),
            pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
        ):  # fmt: skip
            await call.write(message)
        await call.done_writing()
        replies["full-duplex"] = [_plain(m) async for m in _rest(call)]
        if (code := await call.code()) != grpc.StatusCode.OK:
            raise AssertionError(f"full-duplex stream ended with {code}")
    return replies


async def _rest(call: Any) -> Any:
    import grpc

    while (message := await call.read()) is not grpc.aio.EOF:
        yield message


def _check(replies: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What is wrong with one floor's replies (empty: all as Envoy needs)."""
    import base64

    problems: list[str] = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    lb = "envoy.lb"
    only = replies["headers-only"]
    expect(len(only) == 1 and "requestHeaders" in only[0], f"headers-only: {only}")
    if only:
        expect(_destination(only[0], "requestHeaders") == {DESTINATION: ENDPOINTS[0]}, "headers-only: destination")
        expect(
            only[0].get("requestHeaders", {}).get("response", {}).get("clearRouteCache") is True,
            "headers-only: clear_route_cache",
        )
        expect(only[0].get("dynamicMetadata") == {lb: {DESTINATION: ENDPOINTS[0]}}, "headers-only: envoy.lb metadata")

    buffered = replies["buffered"]
    phases = [next(iter(k for k in r if k != "dynamicMetadata"), "") for r in buffered]
    expect(phases == ["requestHeaders", "requestBody", "responseHeaders", "responseBody"], f"buffered: {phases}")
    if len(buffered) == 4:
        expect(_destination(buffered[0], "requestHeaders") == {}, "buffered: headers must CONTINUE without mutation")
        expect(_destination(buffered[1], "requestBody") == {DESTINATION: ENDPOINTS[1]}, "buffered: body destination")
        expect(buffered[1].get("dynamicMetadata") == {lb: {DESTINATION: ENDPOINTS[1]}}, "buffered: metadata")
        expect(buffered[2] == {"responseHeaders": {}} and buffered[3] == {"responseBody": {}}, "buffered: CONTINUE")

    duplex = replies["full-duplex"]
    phases = [next(iter(k for k in r if k != "dynamicMetadata"), "") for r in duplex]
    want = ["requestHeaders", "requestBody", "requestBody", "responseHeaders"] + ["responseBody"] * 4
    expect(phases == [*want, "responseTrailers"], f"full-duplex: {phases}")
    if len(duplex) == len(want) + 1:
        expect(
            _destination(duplex[0], "requestHeaders")
            == {DESTINATION: ENDPOINTS[2], "content-length": str(len(BIG_BODY))},
            "full-duplex: destination + content-length on the deferred headers reply",
        )
        streamed = [r["requestBody"]["response"]["bodyMutation"]["streamedResponse"] for r in duplex[1:3]]
        echoed = b"".join(base64.b64decode(s.get("body", "")) for s in streamed)
        expect(echoed == BIG_BODY, "full-duplex: request body echoed whole")
        expect([s.get("endOfStream", False) for s in streamed] == [False, True], "full-duplex: request body EoS last")
        chunks = [r["responseBody"]["response"]["bodyMutation"]["streamedResponse"] for r in duplex[4:8]]
        expect(
            [base64.b64decode(c.get("body", "")) for c in chunks]
            == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""],
            "full-duplex: response chunks echoed one by one",
        )
        expect([c.get("endOfStream", False) for c in chunks] == [False, False, False, True], "full-duplex: EoS")
    return problems


async def _selftest_one(name: str, argv: list[str]) -> tuple[dict[str, list[dict[str, Any]]], float]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        started = time.monotonic()
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
        ready = json.loads(line)
        if set(ready) != {"event", "port"} or ready["event"] != "ready" or not ready["port"]:
            raise AssertionError(f"{name}: bad ready line {line!r}")
        ready_s = time.monotonic() - started
        async with asyncio.timeout(30):
            return await _drive(int(ready["port"])), ready_s
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def selftest() -> int:
    commands = floor_commands("127.0.0.1:0", ENDPOINTS)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    failed = False
    print("| floor | ready in | stream | replies | checks |")
    print("|---|---|---|---|---|")
    for name, argv in commands.items():
        replies, ready_s = await _selftest_one(name, argv)
        results[name] = replies
        problems = _check(replies)
        failed |= bool(problems)
        for stream, out in replies.items():
            mine = [p for p in problems if p.startswith(stream)]
            print(f"| {name} | {ready_s * 1000:.0f} ms | {stream} | {len(out)} | {'; '.join(mine) or 'ok'} |")
    same = results["floor-go"] == results["floor-py"]
    failed |= not same
    print(f"\nGo and Python floors sent identical replies on every stream: {'yes' if same else 'NO'}")
    if not same:
        for stream in results["floor-go"]:
            if results["floor-go"][stream] != results["floor-py"][stream]:
                print(f"  {stream}:\n    go: {results['floor-go'][stream]}\n    py: {results['floor-py'][stream]}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build the Go floor (cached); --selftest drives both floors")
    parser.add_argument("--selftest", action="store_true", help="start both floors and check their replies")
    args = parser.parse_args(argv)
    try:
        binary = floor_go_binary()
    except BuildFailed as exc:
        print(f"floor-go: {exc}", file=sys.stderr)
        return 1
    print(binary, flush=True)
    if args.selftest:
        import uvloop

        return uvloop.run(selftest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
