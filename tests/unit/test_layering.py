"""Import direction (style R2), checked from the source: the layers stay apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("epp/scheduling", ("grpc", "aiohttp", "kubernetes_asyncio", "envoy", "epp.extproc", "epp.app")),
        ("epp/datalayer", ("grpc", "envoy", "epp.extproc", "epp.scheduling", "epp.routing", "epp.app")),
        ("epp/openai.py", ("grpc", "aiohttp", "envoy", "epp.extproc")),
        ("epp/routing.py", ("grpc", "aiohttp", "envoy", "epp.extproc", "epp.app")),
        ("epp", ("epp_sim",)),
        ("epp_sim", ("epp",)),
    ],
)
def test_layers_do_not_import_upwards(package, forbidden):
    target = SRC / package
    files = [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))
    bad = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert not bad, bad
