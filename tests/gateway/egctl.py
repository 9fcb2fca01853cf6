"""The project's manifests as Envoy Gateway renders them: kustomize, then ``egctl x translate``.

* ``build(overlay)``: the overlay's objects, from ``kubectl kustomize`` when kubectl is
  installed, else the stand-in of ``tests/manifests`` (which the manifest tests keep equal
  to the real one).
* ``translate(docs, workdir)``: ``egctl x translate --from gateway-api --to xds -t all -o
  yaml --add-missing-resources``, offline, on the objects egctl can load (it has no
  InferencePool or InferenceModel type and fails on them: they are left out, and a test
  that needs them says so).  Returns the dump: ``{"xds": {"<ns>/<gateway>": {"configs": [...]}}}``.

``egctl`` itself comes from ``tools.egctl.build`` (installed with Go once, cached).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from tools.egctl.build import ensure_egctl

from manifests.test_manifests import kustomize

ROOT = Path(__file__).resolve().parents[2] / "manifests"
OVERLAYS = ROOT / "scenario" / "overlays"
UNLOADABLE = frozenset({"InferencePool", "InferenceModel", "InferenceObjective"})  # not in egctl's scheme
_TIMEOUT_S = 120


def build(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects (a fresh copy each call)."""
    return copy.deepcopy(_build(overlay))


@functools.cache
def _build(overlay: str) -> list[dict[str, Any]]:
    directory = OVERLAYS / overlay
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return kustomize(directory)
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=_TIMEOUT_S, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def translate(docs: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """egctl's xDS for ``docs`` (minus the kinds it cannot load)."""
    loadable = [d for d in docs if d["kind"] not in UNLOADABLE]
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "resources.yaml"
    source.write_text(yaml.safe_dump_all(loadable, sort_keys=False))
    # No kubeconfig: translate is offline and must not find a cluster to talk to.
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | {"KUBECONFIG": str(workdir / "no-kubeconfig")}
    cmd = [str(ensure_egctl()), "x", "translate", "--from", "gateway-api", "--to", "xds", "-t", "all", "-o", "yaml",
           "--add-missing-resources", "-f", str(source)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False, env=env)
    assert out.returncode == 0, f"egctl failed ({out.returncode}): {out.stderr}"
    (workdir / "xds.yaml").write_text(out.stdout)
    dump = yaml.safe_load(out.stdout)
    assert isinstance(dump, dict) and dump.get("xds"), f"egctl rendered no xDS:\n{out.stdout[:2000]}\n{out.stderr}"
    return dump


def render(overlay: str, workdir: Path) -> dict[str, Any]:
    return translate(build(overlay), workdir)


class Renders:
    """Named egctl renders for a test session, started together (two at a time: two cores)
    the first time any is asked for, each rendered once.  ``docs(name)`` are the objects
    rendered, ``dump(name)`` egctl's output."""

    def __init__(self, workdir: Path, variants: dict[str, Callable[[], list[dict[str, Any]]]]) -> None:
        self._workdir = workdir
        self._variants = variants
        self._docs: dict[str, list[dict[str, Any]]] = {}
        self._futures: dict[str, Future[dict[str, Any]]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def _start(self) -> None:
        if self._pool is not None:
            return
        ensure_egctl()  # once, before the threads (a cold install takes minutes)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="egctl")
        for name, make in self._variants.items():
            self._docs[name] = make()
            self._futures[name] = self._pool.submit(translate, copy.deepcopy(self._docs[name]), self._workdir / name)

    def docs(self, name: str) -> list[dict[str, Any]]:
        self._start()
        return copy.deepcopy(self._docs[name])

    def dump(self, name: str) -> dict[str, Any]:
        self._start()
        return self._futures[name].result(timeout=_TIMEOUT_S * 2)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
