"""The saturation detector (``epp/scheduling/saturation.py``)."""

from __future__ import annotations

import pytest

from epp.scheduling.saturation import UtilizationDetector

from support.scheduling import cands, m, req


def test_utilization_detector():
    d = UtilizationDetector()
    assert d.saturation([m(waiting=5), m(kv=0.8)]) == pytest.approx(1.0)
    assert d.saturation([m(waiting=1), None]) == pytest.approx(0.6)  # stale counts as saturated
    assert d.filter(req(), cands([m(waiting=1), m(waiting=9), None])) == [0]
    assert d.filter(req(), cands([m(waiting=9), None])) == [0, 1]  # never filters everything
