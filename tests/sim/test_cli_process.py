"""The `epp-sim` console script as a separate process: announce ports, serve, exit 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import sys

import aiohttp

LINE = re.compile(r"^epp-sim pod (\S+) listening on 127\.0\.0\.1:(\d+)$")


async def test_cli_serves_pods_and_exits_cleanly_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp_sim.cli", "--pods", "2", "--port", "0", "--profile", "fast",
        "--lora-modules", "sql-lora", "tweet-summary=/adapters/ts",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        pods = []
        for _ in range(2):
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
            m = LINE.match(line)
            assert m, line
            pods.append((m.group(1), int(m.group(2))))
        assert [name for name, _ in pods] == ["pod-0", "pod-1"]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for name, port in pods:
                body = {"model": "tweet-summary", "prompt": "hello", "max_tokens": 2}
                async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as resp:
                    assert resp.status == 200 and resp.headers["x-sim-pod"] == name
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
                for family in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"):
                    assert f"\n{family}{{" in text
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()


async def test_cli_rejects_bad_flags() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp_sim.cli", "--pods", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2 and b"--pods must be at least 1" in err
