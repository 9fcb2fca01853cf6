"""The one percentile every benchmark reports.

`percentile(values, q)` is linear interpolation between closest ranks, with q in 0..100:
sort the n values, take the fractional rank x = (n - 1) * q / 100 and interpolate
between the values at ranks floor(x) and floor(x) + 1. q = 0 is the minimum, q = 100 the
maximum and q = 50 the median (as `statistics.median` gives it). This is numpy's default
(`method="linear"`) and `statistics.quantiles(..., method="inclusive")`. An empty input
gives NaN; a q outside 0..100 raises ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["percentile"]


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, linearly interpolated between closest ranks."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100, got {q}")
    ordered = sorted(values)  # already-sorted input costs one linear pass
    if not ordered:
        return math.nan
    x = (len(ordered) - 1) * q / 100
    lo = math.floor(x)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (x - lo)
