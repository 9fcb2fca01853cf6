"""The datastore: the pools as discovery last reported them, the latest metrics, the load ledger.

Invariants:
* discovery swaps in whole values (:class:`~epp.domain.Pool`, :class:`~epp.domain.ModelPolicies`);
  the scraper swaps in whole :class:`~epp.domain.EndpointMetrics`; nothing is mutated in place;
* every view handed out is read-only (tuples, ``frozenset``, ``MappingProxyType``);
* the staleness rule lives here and only here: metrics older than ``staleness`` seconds
  by this datastore's clock are not fresh, and :meth:`Datastore.fresh_metrics` says so;
* epp's own load is counted in :attr:`Datastore.load` (a :class:`LoadLedger`), which
  outlives pool changes so every claim is released exactly once;
* an endpoint whose last scrape found nothing listening is *unreachable*: it stays in the
  pool (discovery owns membership) but :meth:`Datastore.routable` leaves it out, unless
  every endpoint is unreachable; its next good scrape brings it back;
* what each endpoint serves (its ``/v1/models``: base model and loaded adapters) is kept
  per address, with an index model → addresses.
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
        self._unreachable: set[str] = set()
        self._routable: tuple[Endpoint, ...] = ()
        self._served: dict[str, frozenset[str]] = {}  # address → models its /v1/models lists
        self._servers: dict[str, frozenset[str]] = {}  # model → addresses listing it
        self._stale_served: set[str] = set()  # asked to re-read /v1/models (a 404 for a model)
        self.serving_version = 0  # bumped whenever what anyone serves changes (lets callers cache)
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
        for address in [a for a in self._served if a not in self._by_address]:
            self.set_served_models(address, None)
        self._unreachable &= self._by_address.keys()
        self._update_routable()
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

    def routable(self) -> tuple[Endpoint, ...]:
        """The primary pool's endpoints minus unreachable ones (all of them if none is reachable)."""
        return self._routable

    def set_unreachable(self, address: str, unreachable: bool) -> None:
        """Nothing listens there (a refused connection), or it answered again."""
        if address not in self._by_address or (address in self._unreachable) == unreachable:
            return
        if unreachable:
            self._unreachable.add(address)
        else:
            self._unreachable.discard(address)
        self._update_routable()

    def _update_routable(self) -> None:
        endpoints = self.endpoints()
        if self._unreachable:
            alive = tuple(e for e in endpoints if e.address not in self._unreachable)
            self._routable = alive or endpoints
        else:
            self._routable = endpoints

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
        if address in self._unreachable:
            self.set_unreachable(address, False)

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
        self.serving_version += 1

    # ---- what each endpoint serves -------------------------------------------------------
    def set_served_models(self, address: str, models: frozenset[str] | None) -> None:
        """The models an endpoint's ``/v1/models`` lists (None: unknown, e.g. no such endpoint)."""
        old = self._served.pop(address, _NONE)
        if models is not None and address in self._by_address:
            self._served[address] = models
        new = self._served.get(address, _NONE)
        for m in old - new:
            holders = self._servers.get(m, _NONE) - {address}
            if holders:
                self._servers[m] = holders
            else:
                self._servers.pop(m, None)
        for m in new - old:
            self._servers[m] = self._servers.get(m, _NONE) | {address}
        if old != new:
            self.serving_version += 1

    def refresh_served_models(self, address: str) -> None:
        """A pod answered "model not found": ask for its ``/v1/models`` to be read again."""
        if address in self._by_address:
            self._stale_served.add(address)

    def take_served_refresh(self, address: str) -> bool:
        """Whether a re-read of the address's ``/v1/models`` was asked for (and clear the ask)."""
        if address in self._stale_served:
            self._stale_served.discard(address)
            return True
        return False

    def served_models(self, address: str) -> frozenset[str] | None:
        return self._served.get(address)

    def servers_of(self, model: str) -> frozenset[str]:
        """Addresses known to serve ``model``: listed by ``/v1/models`` or running it as an adapter."""
        return self._servers.get(model, _NONE) | self._adapters.get(model, _NONE)
