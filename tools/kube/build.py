"""kube-apiserver and etcd for the Kubernetes tests and benchmarks: built or installed once, cached.

``ensure_kube_apiserver()`` builds ``k8s.io/kubernetes/cmd/kube-apiserver`` at a pinned
version from the Go module proxy in a scratch module and caches the binary under
``~/.cache/epp/kube/<version>/``; ``ensure_etcd()`` finds ``etcd`` (Debian's
``etcd-server``), installing it with apt-get when it is missing and we are root.

``python -m tools.kube.build`` (from the repository root) does both and prints the two
paths; ``make test`` runs it before pytest so the build (minutes, once) is not charged to a
test timeout.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tools.run import GoMissing, Ran, epp_cache, find_go, run_echoing

KUBE_VERSION = "v1.34.2"
STAGING_VERSION = "v0.34.2"
BUILD_TIMEOUT_S = 3600.0  # a cold build on 2 cores downloads and compiles most of Kubernetes

# Every staging module k8s.io/kubernetes requires at v0.0.0 and replaces with ./staging/...;
# a module that depends on k8s.io/kubernetes must pin them all itself.
STAGING = (
    "api", "apiextensions-apiserver", "apimachinery", "apiserver", "cli-runtime", "client-go",
    "cloud-provider", "cluster-bootstrap", "code-generator", "component-base", "component-helpers",
    "controller-manager", "cri-api", "cri-client", "csi-translation-lib", "dynamic-resource-allocation",
    "endpointslice", "externaljwt", "kms", "kube-aggregator", "kube-controller-manager", "kube-proxy",
    "kube-scheduler", "kubectl", "kubelet", "metrics", "mount-utils", "pod-security-admission",
    "sample-apiserver", "sample-cli-plugin", "sample-controller",
)


class ToolMissing(RuntimeError):
    """A prerequisite (Go, or etcd with no way to install it) is not on this machine."""


class BuildFailed(RuntimeError):
    pass


def cache_dir() -> Path:
    return epp_cache("kube", KUBE_VERSION)


def _say(message: str) -> None:
    print(f"[kube-tools] {message}", file=sys.stderr, flush=True)




def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], deadline: float) -> Ran:
    ran = run_echoing(cmd, cwd=cwd, env=env, deadline=deadline, label="kube-tools")
    if ran.timed_out:
        raise BuildFailed(f"{' '.join(cmd)}: took longer than {BUILD_TIMEOUT_S:.0f}s\n{ran.describe()}")
    return ran


def _go_mod() -> str:
    lines = ["module epp-kube-apiserver-build", "", "go 1.24", "", f"require k8s.io/kubernetes {KUBE_VERSION}", ""]
    lines += [f"replace k8s.io/{name} => k8s.io/{name} {STAGING_VERSION}" for name in STAGING]
    return "\n".join(lines) + "\n"


_TOOLS_GO = """//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
"""


def ensure_kube_apiserver() -> Path:
    """The cached kube-apiserver binary, built on first use (``EPP_KUBE_APISERVER_BIN`` overrides)."""
    if override := os.environ.get("EPP_KUBE_APISERVER_BIN"):
        return Path(override)
    out = cache_dir()
    binary = out / "kube-apiserver"
    if os.access(binary, os.X_OK):
        return binary
    try:
        go = find_go()
    except GoMissing as exc:
        raise ToolMissing(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it right now
        if os.access(binary, os.X_OK):
            return binary
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        started = time.monotonic()
        _say(f"building kube-apiserver {KUBE_VERSION} into {out} (first run only; several minutes)")
        major, minor = KUBE_VERSION.lstrip("v").split(".")[:2]
        ldflags = " ".join(
            f"-X k8s.io/component-base/version.{key}={value}"
            for key, value in (("gitVersion", KUBE_VERSION), ("gitMajor", major), ("gitMinor", minor))
        )
        with tempfile.TemporaryDirectory(prefix="kube-apiserver-build-") as tmp:
            work = Path(tmp)
            (work / "go.mod").write_text(_go_mod())
            (work / "tools.go").write_text(_TOOLS_GO)  # keeps the requirement through `go mod tidy`
            env = {**os.environ, "GO111MODULE": "on", "CGO_ENABLED": "0"}
            partial = out / "kube-apiserver.partial"
            for step in (
                [go, "mod", "tidy"],
                [go, "build", "-trimpath", "-ldflags", ldflags, "-o", str(partial),
                 "k8s.io/kubernetes/cmd/kube-apiserver"],
            ):
                ran = _run(step, cwd=work, env=env, deadline=deadline)
                if ran.returncode != 0:
                    raise BuildFailed(f"{' '.join(step[:2])} failed (rc={ran.returncode}):\n{ran.describe()}")
            partial.rename(binary)  # atomic: a reader never sees a half-written binary
        _say(f"built {binary} in {time.monotonic() - started:.0f}s")
    return binary


def ensure_etcd() -> Path:
    """``etcd`` from PATH or /usr/bin; installs Debian's etcd-server when missing (as root)."""
    if override := os.environ.get("EPP_ETCD_BIN"):
        return Path(override)
    for candidate in (shutil.which("etcd"), "/usr/bin/etcd"):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ToolMissing("etcd is not installed (apt-get install etcd-server)")
    _say("installing etcd-server with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + 600
    install = ["apt-get", "install", "-y", "--no-install-recommends", "etcd-server"]
    ran = _run(install, cwd=Path("/"), env=env, deadline=deadline)
    if ran.returncode != 0:
        _run(["apt-get", "update"], cwd=Path("/"), env=env, deadline=deadline)
        ran = _run(install, cwd=Path("/"), env=env, deadline=deadline)
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    if ran.returncode != 0 or not os.access(etcd, os.X_OK):
        raise BuildFailed(f"apt-get install etcd-server failed:\n{ran.describe()}")
    # Debian starts the packaged etcd service on 127.0.0.1:2379; the tests run their own on
    # other ports, so it does not matter whether it runs.
    return Path(etcd)


if __name__ == "__main__":  # `python -m tools.kube.build`: build/install once, print paths
    try:
        print(ensure_etcd())
        print(ensure_kube_apiserver())
    except ToolMissing as exc:  # the Kubernetes tests skip with the same message
        print(f"kube-tools: {exc}", file=sys.stderr)
