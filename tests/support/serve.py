"""`epp serve` as a real process, started on free ports and awaited until its ready line.

The readiness contract (src/epp/cli.py, ``App.ready_line``): once every port is bound and
the pool is known, ``epp serve`` prints exactly one JSON line on stdout,
``{"event": "ready", "grpc_port": N, "health_port": N, "metrics_port": N, "pool": "name",
"endpoints": N, "tls": bool}``; logs go to stderr.  ``start_serve`` reads that line (with
a deadline) and nothing else: stderr is left to pytest's capture, so a failing test shows
epp's log.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EPP = [sys.executable, "-m", "epp"]
READY_KEYS = frozenset({"event", "discovery", "grpc_port", "health_port", "metrics_port", "pool", "endpoints", "tls"})


@dataclass
class Serving:
    """A running ``epp serve``: the process and its parsed ready line."""

    proc: asyncio.subprocess.Process
    ready: dict[str, Any]

    def address(self, port: str) -> str:
        """``127.0.0.1:<port>`` for ``grpc``, ``health`` or ``metrics``."""
        return f"127.0.0.1:{self.ready[f'{port}_port']}"

    async def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then the exit code (bounded by ``timeout``); kills it if it hangs."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def read_ready_line(proc: asyncio.subprocess.Process, timeout: float = 20.0) -> dict[str, Any]:
    """The first stdout line, which must be the ready JSON line, within ``timeout`` seconds."""
    assert proc.stdout is not None, "start epp with stdout=PIPE"
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    assert line, f"epp exited (code {await proc.wait()}) before its ready line"
    ready = json.loads(line)
    assert isinstance(ready, dict) and ready.get("event") == "ready", line
    return ready


async def start_serve(pool: Path, *extra: str, timeout: float = 20.0) -> Serving:
    """``epp serve --pool-file POOL`` on port 0 everywhere (127.0.0.1), up to its ready line."""
    return await start_epp_serve("--pool-file", str(pool), *extra, timeout=timeout)


async def start_epp_serve(*args: str, timeout: float = 20.0) -> Serving:
    """``epp serve ARGS`` with every port 0 on 127.0.0.1, up to its ready line (killed if it never comes)."""
    proc = await asyncio.create_subprocess_exec(
        *EPP, "serve", "--grpc-port", "0", "--grpc-health-port", "0", "--metrics-port", "0",
        "--bind-address", "127.0.0.1", *args,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        return Serving(proc, await read_ready_line(proc, timeout))
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise


@asynccontextmanager
async def serving(pool: Path, *extra: str) -> AsyncIterator[Serving]:
    """``start_serve`` that always cleans up: killed on the way out unless the test stopped it."""
    served = await start_serve(pool, *extra)
    try:
        yield served
    finally:
        await served.kill()
