"""The one hypothesis profile the fuzz tests use in CI: the same examples on every run
(derived from each test's source), nothing written into the repository, no deadline on a
shared machine."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def ci(max_examples: int) -> settings:
    return settings(
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=max_examples,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
