"""Fixtures for the tests behind gateways' own wirings (see harness.py, egctl.py, scenario.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from tools.egctl.build import GoMissing, ensure_egctl

from .egctl import Renders
from .harness import Stacks
from .scenario import VARIANTS
from .xds import Dump


@pytest.fixture
async def stacks(tmp_path: Path) -> AsyncIterator[Stacks]:
    """Pods, epp, Envoy for one test, all stopped (in reverse order) afterwards."""
    owner = Stacks(tmp_path)
    try:
        yield owner
    finally:
        await owner.aclose()


@pytest.fixture(scope="session")
def renders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Renders]:
    """Every egctl render of the session (scenario.VARIANTS), started together on first use.
    Skipped only without a Go toolchain to build egctl with."""
    try:
        ensure_egctl()
    except GoMissing as exc:
        pytest.skip(f"egctl cannot be built: {exc}")
    owner = Renders(tmp_path_factory.mktemp("egctl"), VARIANTS)
    try:
        yield owner
    finally:
        owner.close()


@pytest.fixture(scope="session")
def seed_docs(renders: Renders) -> list[dict[str, Any]]:
    return renders.docs("seed")


@pytest.fixture(scope="session")
def seed(renders: Renders) -> Dump:
    return Dump(renders.dump("seed"))


@pytest.fixture(scope="session")
def load_aware(renders: Renders) -> Dump:
    return Dump(renders.dump("load-aware"))
