"""``egctl`` (Envoy Gateway's CLI) at a pinned version: installed with Go once, cached.

``egctl x translate --from gateway-api --to xds`` renders Gateway API + Envoy Gateway
objects into the xDS Envoy Gateway would serve, with no cluster; ``tests/gateway`` turns
that into a static Envoy bootstrap.  A cold install compiles Envoy Gateway and its
Kubernetes dependencies: about 8 minutes on 2 cores, a 333 MB binary.

``EPP_EGCTL_BIN`` may point at a prebuilt binary instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tools.run import GoMissing, Ran, cached_binary, epp_cache, find_go, run_echoing

MODULE = "github.com/envoyproxy/gateway"
PACKAGE = f"{MODULE}/cmd/egctl"
VERSION = "v1.9.1"
BUILD_TIMEOUT_S = 2400.0




class BuildFailed(RuntimeError):
    pass


def cache_dir() -> Path:
    return epp_cache("egctl", VERSION)


def _say(message: str) -> None:
    print(f"[egctl] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], deadline: float) -> Ran:
    ran = run_echoing(cmd, cwd=cwd, env=env, deadline=deadline, label="egctl")
    if ran.timed_out:
        raise BuildFailed(f"{' '.join(cmd)}: took longer than {BUILD_TIMEOUT_S:.0f}s\n{ran.describe()}")
    return ran


def ensure_egctl() -> Path:
    """The cached egctl binary, installed with ``go install`` on first use."""
    if override := os.environ.get("EPP_EGCTL_BIN"):
        return Path(override)
    return cached_binary(cache_dir(), "egctl", _install)


def _install(binary: Path) -> None:
    go, started = find_go(), time.monotonic()
    deadline = started + BUILD_TIMEOUT_S
    _say(f"installing {PACKAGE}@{VERSION} into {binary.parent} (first run only; about 8 minutes)")
    with tempfile.TemporaryDirectory(prefix="egctl-build-") as tmp:
        work, staging = Path(tmp), Path(tmp) / "bin"
        env = {**os.environ, "GOBIN": str(staging), "GO111MODULE": "on"}
        ran = _run([go, "install", "-v", f"{PACKAGE}@{VERSION}"], cwd=work, env=env, deadline=deadline)
        if ran.returncode != 0 and "loading deprecation" in ran.describe():
            # `go install pkg@version` asks the proxy for the module's version list (to warn
            # about deprecation) and fails when a filtering proxy refuses it; building the
            # same pinned version from a scratch module skips that lookup.
            _say("the module proxy refused the version-list lookup; building in a scratch module")
            for step in ([go, "mod", "init", "epp-egctl-build"], [go, "get", f"{PACKAGE}@{VERSION}"],
                         [go, "install", "-v", PACKAGE]):
                ran = _run(step, cwd=work, env=env, deadline=deadline)
                if ran.returncode != 0:
                    break
        built = staging / "egctl"
        if ran.returncode != 0 or not os.access(built, os.X_OK):
            raise BuildFailed(f"go install {PACKAGE}@{VERSION} failed (rc={ran.returncode}):\n{ran.describe()}")
        partial = binary.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.rename(binary)  # atomic: a reader never sees a half-written binary
    _say(f"installed {binary} in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":  # `python -m tools.egctl.build`: install (or find) egctl, print its path
    try:
        print(ensure_egctl())
    except GoMissing as exc:  # the gateway tests skip with the same message
        print(f"egctl: {exc}", file=sys.stderr)
