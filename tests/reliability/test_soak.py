"""The 1-minute soak: `benchmarks/soak.py --minutes 1 --json` as a process, its summary row judged.

The script starts every part as a separate process (epp-sim pods, `epp serve`, Envoy) and
drives open-loop mixed traffic through Envoy; see its docstring.  This test asserts what
must hold after a minute of it: every outcome was the one its kind promises (no unexpected
status, no transport error), each kind was actually sent, epp's in-flight gauges read 0
once the load stopped, and epp's open fds stayed within the script's bound.  Speed and RSS
are reported (printed), never asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
KINDS = {"completions_json", "chat_json", "completions_sse", "chat_sse", "unknown_model", "malformed_json",
         "disconnect"}  # fmt: skip
FD_GROWTH_BOUND = 10  # the script's default, passed explicitly so the test states it


def run_soak(*args: str, timeout: float) -> tuple[int, list[dict[str, Any]], str]:
    """Run the soak in its own process group; on any way out, nothing it started is left running."""
    proc = subprocess.Popen(
        [sys.executable, str(SOAK), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # timed out or interrupted: the script's own clean-up first, then the group
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, [json.loads(line) for line in out.splitlines()], err


@pytest.mark.timeout(240)
def test_one_minute_soak_has_no_unexpected_outcome_no_leaked_inflight_and_bounded_fds() -> None:
    code, rows, err = run_soak("--minutes", "1", "--fd-growth-bound", str(FD_GROWTH_BOUND), "--json", timeout=200)
    print(err)  # the script's tables (RSS, fds, latency) for the record: `pytest -s` shows them
    assert rows, f"no JSON rows (exit {code}); stderr:\n{err}"
    *samples, summary = rows
    assert summary["row"] == "summary", summary
    assert {s["row"] for s in samples} == {"sample"}
    assert [samples[0]["phase"], samples[-1]["phase"]] == ["start", "end"]
    assert len(samples) >= 3, "a start sample, at least one during the load, an end sample"

    assert summary["unexpected"] == 0, summary["unexpected_examples"]
    assert summary["transport_errors"] == 0, summary["unexpected_examples"]
    assert set(summary["kinds"]) == KINDS
    for kind, counts in summary["kinds"].items():
        assert counts["sent"] > 0, kind
        assert counts["expected"] == counts["sent"], (kind, counts)

    assert summary["inflight_end"] == 0
    assert summary["streams_end"] == 0
    assert summary["pod_inflight_end"] == 0
    assert summary["fd_growth_bound"] == FD_GROWTH_BOUND
    assert summary["epp_fd_growth"] <= FD_GROWTH_BOUND, (summary["epp_fds_start"], summary["epp_fds_end"])

    assert summary["ok"] is True and summary["failures"] == [], summary["failures"]
    assert code == 0, err[-2000:]
