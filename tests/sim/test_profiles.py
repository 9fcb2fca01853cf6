"""Timing profiles (``epp_sim/profiles.py``): H100 calibration of decode and prefill."""

from __future__ import annotations

import pytest

from epp_sim.profiles import H100_8B, get_profile


@pytest.mark.parametrize(
    ("batch", "ctx", "low_ms", "high_ms"),
    [(1, 1024, 5.5, 6.5), (64, 1024, 9.0, 10.0), (64, 2048, 11.5, 12.5), (256, 1024, 18.5, 20.5)],
    ids=["b1", "b64", "b64-ctx2048", "b256"],
)
def test_h100_decode_calibration(batch: int, ctx: int, low_ms: float, high_ms: float) -> None:
    t = H100_8B.step_time(batch, batch * ctx, batch * (ctx - 0.5)) * 1e3
    assert low_ms <= t <= high_ms


@pytest.mark.parametrize("tokens", [512, 2048, 8192])
def test_h100_prefill_throughput(tokens: int) -> None:
    rate = tokens / H100_8B.step_time(tokens, tokens, tokens * tokens / 2)
    assert 33_000 <= rate <= 40_000


def test_unknown_profile() -> None:
    with pytest.raises(KeyError, match="h100-8b"):
        get_profile("tpu")
