"""The datastore: the pools as discovery last reported them, the latest metrics, the load ledger.

Invariants:
* discovery swaps in whole values (:class:`~epp.domain.Pool`, :class:`~epp.domain.ModelPolicies`);
  the scraper swaps in whole :class:`~epp.domain.EndpointMetrics`; nothing is mutated in place;
* every view handed out is read-only (tuples, ``frozenset``, ``MappingProxyType``);
* the staleness rule lives here and only here: metrics older than ``staleness`` seconds
  by this datastore's clock are not fresh, and :meth:`Datastore.fresh_metrics` says so;
* epp's own load is counted in :attr:`Datastore.load` (a :class:`LoadLedger`), which
  outlives pool changes so every claim is released exactly once;
* synchronous, event-loop thread only: no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType

from epp.datalayer.ledger import LoadLedger
from epp.domain import Endpoint, EndpointMetrics, ModelPolicies, Pool

_NONE: frozenset[str] = frozenset()


class Datastore:
    """The primary pool, an optional mirror (shadow) pool, the model policies, and what epp knows of each endpoint."""

    def __init__(self, *, staleness: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.staleness = staleness
        self.clock = clock
        self.load = LoadLedger()
        self._pool: Pool | None = None
        self._mirror: Pool | None = None
        self._policies = ModelPolicies()
        self._by_address: dict[str, Endpoint] = {}
        self._pool_of: dict[str, Pool] = {}
        self._metrics: dict[str, EndpointMetrics] = {}
        self._adapters: dict[str, frozenset[str]] = {}  # adapter → addresses whose last scrape reported it
        self._listeners: list[Callable[[], None]] = []
        self.metrics_view: Mapping[str, EndpointMetrics] = MappingProxyType(self._metrics)

    # ---- what discovery sets -------------------------------------------------------------
    @property
    def pool(self) -> Pool | None:
        """The primary pool; None before discovery found it, or after it was deleted."""
        return self._pool

    @property
    def mirror(self) -> Pool | None:
        return self._mirror

    @property
    def policies(self) -> ModelPolicies:
        return self._policies

    @property
    def ready(self) -> bool:
        """A primary pool is known (readiness reports SERVING only then)."""
        return self._pool is not None

    def set_pool(self, pool: Pool | None) -> None:
        self._pool = pool
        self._membership_changed()

    def set_mirror(self, pool: Pool | None) -> None:
        self._mirror = pool
        self._membership_changed()

    def set_policies(self, policies: ModelPolicies) -> None:
        self._policies = policies
        self._notify()

    def apply(self, pool: Pool | None, mirror: Pool | None, policies: ModelPolicies) -> None:
        """Everything at once (a pool file): one change notification."""
        self._pool, self._mirror, self._policies = pool, mirror, policies
        self._membership_changed()

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _membership_changed(self) -> None:
        pools = [p for p in (self._pool, self._mirror) if p is not None]
        self._pool_of = {e.address: p for p in reversed(pools) for e in p.endpoints}  # primary wins
        self._by_address = {e.address: e for p in reversed(pools) for e in p.endpoints}
        for address in [a for a in self._metrics if a not in self._by_address]:
            self._index_adapters(address, self._metrics.pop(address).active_adapters, _NONE)
            self.load.forget(address)
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    # ---- membership views --------------------------------------------------------------
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The primary pool's endpoints (the same tuple object until the pool changes)."""
        return self._pool.endpoints if self._pool is not None else ()

    def mirror_endpoints(self) -> tuple[Endpoint, ...]:
        return self._mirror.endpoints if self._mirror is not None else ()

    def get(self, address: str) -> Endpoint | None:
        return self._by_address.get(address)

    def pool_of(self, address: str) -> Pool | None:
        """The pool an address belongs to (the primary when both list it)."""
        return self._pool_of.get(address)

    def all_endpoints(self) -> Iterable[Endpoint]:
        """Every endpoint of both pools, each address once."""
        return self._by_address.values()

    # ---- metrics ---------------------------------------------------------------------
    def set_metrics(self, address: str, metrics: EndpointMetrics) -> None:
        """Swap in one scrape; ignored for an address no longer in a pool."""
        if address not in self._by_address:
            return
        old = self._metrics.get(address)
        self._metrics[address] = metrics
        if old is None or old.active_adapters != metrics.active_adapters:
            self._index_adapters(address, old.active_adapters if old else _NONE, metrics.active_adapters)
        self.load.scraped(address)

    def metrics(self, address: str) -> EndpointMetrics | None:
        """The last scrape, whatever its age."""
        return self._metrics.get(address)

    def fresh_metrics(self, address: str) -> EndpointMetrics | None:
        """The last scrape if it is fresh, else None (stale or never scraped)."""
        return self.fresh_metrics_of((address,))[0]

    def fresh_metrics_of(self, addresses: Sequence[str]) -> list[EndpointMetrics | None]:
        """:meth:`fresh_metrics` for many addresses at one instant."""
        oldest = self.clock() - self.staleness
        get = self._metrics.get
        out: list[EndpointMetrics | None] = []
        for a in addresses:
            m = get(a)
            out.append(m if m is not None and m.updated_at >= oldest else None)
        return out

    def endpoints_with_adapter(self, adapter: str) -> frozenset[str]:
        """Addresses whose last scrape reported ``adapter`` active (any age)."""
        return self._adapters.get(adapter, _NONE)

    def _index_adapters(self, address: str, old: frozenset[str], new: frozenset[str]) -> None:
        for a in old - new:
            holders = self._adapters.get(a, _NONE) - {address}
            if holders:
                self._adapters[a] = holders
            else:
                self._adapters.pop(a, None)
        for a in new - old:
            self._adapters[a] = self._adapters.get(a, _NONE) | {address}
