"""Run a long build command (``go build``, ``go install``, ``apt-get``) with progress and a deadline.

The one copy of what the cached-binary helpers share (``tools.kube.build`` for kube-apiserver
and etcd, ``tests/support/llmd_sim.py`` for llm-d-inference-sim): every output line is echoed
to stderr as it comes (a cold Go build takes minutes; silence looks like a hang), the last
lines are kept for the error message, and the command is killed at an absolute deadline.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GoMissing", "Ran", "epp_cache", "find_go", "run_echoing"]

TAIL_LINES = 40


class GoMissing(RuntimeError):
    """No Go toolchain on this machine."""


def epp_cache(*parts: str) -> Path:
    """``~/.cache/epp/<parts>`` (or under ``$XDG_CACHE_HOME``): where built tools are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "epp", *parts)


def find_go() -> str:
    """The ``go`` binary: on PATH, else the usual install places; ``GoMissing`` otherwise."""
    go = shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go", str(Path.home() / "go" / "bin" / "go")) if os.access(p, os.X_OK)), None
    )
    if go is None:
        raise GoMissing("no Go toolchain: `go` is neither on PATH nor in /usr/local/go/bin")
    return go


@dataclass(frozen=True, slots=True)
class Ran:
    """How a command ended: its exit code, its last output lines, whether the deadline killed it."""

    returncode: int
    tail: tuple[str, ...]
    timed_out: bool

    def describe(self) -> str:
        return "\n".join(self.tail)


def run_echoing(cmd: list[str], *, cwd: Path, env: Mapping[str, str], deadline: float, label: str) -> Ran:
    """Run ``cmd`` until it exits or ``deadline`` (``time.monotonic()``) passes; echo its output.

    stdout and stderr are merged; each line goes to our stderr as ``  line``, the command
    itself first as ``[label] $ cmd``.
    """
    print(f"[{label}] $ " + " ".join(cmd), file=sys.stderr, flush=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    killer = threading.Timer(max(0.0, deadline - time.monotonic()), proc.kill)
    killer.start()
    try:
        for raw in proc.stdout:
            line = raw.rstrip()
            tail.append(line)
            print(f"  {line}", file=sys.stderr, flush=True)
        rc = proc.wait()
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return Ran(rc, tuple(tail), timed_out=time.monotonic() >= deadline)


def cached_binary(out: Path, name: str, build: Callable[[Path], None]) -> Path:
    """``out/name`` when it is there; else ``build(binary)`` makes it, once, under a lock
    (another run may be building it right now).  ``build`` must write the file atomically
    (a ``.partial`` then a rename), so a reader never sees half a binary."""
    binary = out / name
    if os.access(binary, os.X_OK):
        return binary
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.access(binary, os.X_OK):
            build(binary)
    return binary
