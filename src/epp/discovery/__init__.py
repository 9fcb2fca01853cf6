"""Discovery: who is in the pool.  Every source feeds the datastore the same values.

A source turns what it reads (the static pool file; the Kubernetes API server's
InferencePool, Pods, InferenceModels and InferenceObjectives) into
:class:`~epp.domain.Pool` and :class:`~epp.domain.ModelPolicies` values and hands them
to a :class:`PoolSink` (the datastore).  It never mutates what it handed over.
"""

from __future__ import annotations

from typing import Protocol

from epp.domain import ModelPolicies, Pool


class PoolSink(Protocol):
    """Where discovery writes: the datastore satisfies it."""

    def set_pool(self, pool: Pool | None) -> None: ...
    def set_mirror(self, pool: Pool | None) -> None: ...
    def set_policies(self, policies: ModelPolicies) -> None: ...
    def apply(self, pool: Pool | None, mirror: Pool | None, policies: ModelPolicies) -> None: ...


class PoolSource(Protocol):
    """A discovery source, as ``App`` drives it."""

    async def sync(self) -> None:
        """The first complete view, written to the sink; a bad configuration raises ``ConfigError``."""

    async def run(self) -> None:
        """Follow changes until cancelled (run under the supervisor, which restarts it if it raises)."""


__all__ = ["PoolSink", "PoolSource"]
