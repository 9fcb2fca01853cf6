"""``epp.grpcenv``: epp's gRPC core defaults, set by its command line before grpc loads.

Each case runs in a fresh interpreter: pytest's own process imported grpc long ago.
"""

from __future__ import annotations

import os
import subprocess
import sys

from epp import grpcenv

PROBE = """
import os, sys
from epp import cli
assert "grpc" not in sys.modules, "importing epp.cli loaded grpc"
code = cli.main(["serve", "--pool-file", sys.argv[1]])
print(repr(os.environ.get("GRPC_EXPERIMENTS")))
"""


def _probe(tmp_path, environ: dict[str, str]) -> str:
    missing = tmp_path / "missing-pool.yaml"  # serve stops at its config error, after the defaults are set
    out = subprocess.run([sys.executable, "-c", PROBE, str(missing)], env=environ, capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def test_epp_sets_its_default_when_the_environment_names_none(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    assert _probe(tmp_path, environ) == repr(grpcenv.GRPC_EXPERIMENTS)


def test_an_operator_setting_wins_even_an_empty_one(tmp_path):
    for value in ("", "-event_engine_client"):
        assert _probe(tmp_path, {**os.environ, "GRPC_EXPERIMENTS": value}) == repr(value)


def test_too_late_once_grpc_is_loaded():
    code = "import os, grpc; from epp import grpcenv; env = {}; print(grpcenv.apply(env), env)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "{}"]
