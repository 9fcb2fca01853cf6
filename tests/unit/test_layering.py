"""The layers of ARCHITECTURE.md, checked from the source: who may import whom.

``LAYERS`` is the table in ARCHITECTURE.md ("Layers and their import rules"): for each
unit, the epp units it may import.  A unit is a top-level module (``epp.routing``) or a
subpackage (``epp.scheduling``); imports inside a unit are free.  Adding a module that
fits no row, or an import a row does not allow, fails here: update ARCHITECTURE.md and
this table together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = next(p for p in Path(__file__).resolve().parents if (p / "src" / "epp").is_dir()) / "src"

LEAVES = {"epp.domain", "epp.errors", "epp.wire"}
LAYERS: dict[str, set[str]] = {
    # leaves: values, errors, wire names
    "epp.domain": set(),
    "epp.errors": set(),
    "epp.wire": set(),
    "epp.observability": set(),
    "epp.supervisor": set(),
    "epp.grpcenv": set(),  # gRPC core settings, applied before grpc loads
    # the pure core
    "epp.config": {"epp.domain", "epp.errors", "epp.wire"},
    "epp.openai": {"epp.domain", "epp.errors"},
    "epp.scheduling": {"epp.domain", "epp.errors"},
    "epp.datalayer": {"epp.domain", "epp.errors"},
    "epp.discovery": {"epp.domain", "epp.errors", "epp.config"},
    "epp.routing": {*LEAVES, "epp.openai", "epp.scheduling"},
    # the edges
    "epp.extproc": {*LEAVES, "epp.observability", "epp.openai", "epp.routing"},
    "epp.envoy": {*LEAVES, "epp.config"},
    "epp.mirror_report": set(),
    "epp.demo": {"epp.config", "epp.envoy", "epp.mirror_report"},
    # assembly
    "epp.app": {
        *LEAVES,
        "epp.config",
        "epp.datalayer",
        "epp.discovery",
        "epp.extproc",
        "epp.observability",
        "epp.routing",
        "epp.scheduling",
        "epp.supervisor",
    },
    "epp.workers": {*LEAVES, "epp.app", "epp.config", "epp.observability", "epp.scheduling"},
    "epp.cli": {
        *LEAVES,
        "epp.app",
        "epp.config",
        "epp.demo",
        "epp.envoy",
        "epp.grpcenv",
        "epp.mirror_report",
        "epp.observability",
        "epp.workers",
    },
    "epp.__main__": {"epp.cli"},
    "epp": set(),
}
THIRD_PARTY_FORBIDDEN = {
    "epp.grpcenv": ("grpc",),  # it must run before grpc loads
    "epp.scheduling": ("grpc", "aiohttp", "kubernetes_asyncio", "envoy", "zmq"),
    "epp.routing": ("grpc", "aiohttp", "kubernetes_asyncio", "envoy"),
    "epp.openai": ("grpc", "aiohttp", "kubernetes_asyncio", "envoy"),
    "epp.datalayer": ("grpc", "kubernetes_asyncio", "envoy"),
    "epp.domain": ("grpc", "aiohttp", "kubernetes_asyncio", "envoy", "pydantic"),
}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


EPP_FILES = sorted((SRC / "epp").rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    assert EPP_FILES
    assert sorted({unit_of(module_name(p)) for p in EPP_FILES} - set(LAYERS)) == []


@pytest.mark.parametrize("path", EPP_FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_layers(path):
    unit = unit_of(module_name(path))
    allowed = LAYERS[unit]
    bad = []
    for name in imports(path):
        if name == "epp_sim" or name.startswith("epp_sim."):
            bad.append(f"imports {name}: epp never imports the simulator")
        elif name.startswith("epp.") and unit_of(name) != unit and unit_of(name) not in allowed:
            bad.append(f"imports {name}")
        if any(name == f or name.startswith(f + ".") for f in THIRD_PARTY_FORBIDDEN.get(unit, ())):
            bad.append(f"imports {name} (third party, not allowed in {unit})")
    assert not bad, bad


def test_the_simulator_never_imports_epp():
    bad = [
        f"{p.relative_to(SRC)} imports {n}"
        for p in sorted((SRC / "epp_sim").rglob("*.py"))
        for n in imports(p)
        if n == "epp" or n.startswith("epp.")
    ]
    assert not bad, bad


def test_the_table_is_the_one_in_architecture_md():
    text = (SRC.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for unit in LAYERS:
        if unit != "epp":
            assert f"`{unit.removeprefix('epp.')}`" in text, f"{unit} is not described in ARCHITECTURE.md"
