"""The datastore: endpoint membership, latest metrics, and epp's own in-flight load.

Invariants:
* endpoint sets and metrics are swapped in whole (never mutated in place);
* every :meth:`Datastore.acquire` returns an :class:`InflightTicket` whose counts are
  removed exactly once, by :meth:`InflightTicket.release` (idempotent), even if the
  endpoint left the pool meanwhile.
* Everything here is synchronous and runs on the event loop thread, so no locks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from epp.domain import Endpoint, EndpointMetrics, ModelPolicy


class InflightTicket:
    """One request's claim on an endpoint; released exactly once."""

    __slots__ = ("_store", "address", "epoch", "released", "tokens")

    def __init__(self, store: Datastore, address: str, tokens: int) -> None:
        self._store = store
        self.address = address
        self.tokens = tokens
        self.released = False
        self.epoch = store._add(address, tokens)

    def move_to(self, address: str) -> None:
        """Account the request to another endpoint (Envoy served a fallback)."""
        if self.released or address == self.address:
            return
        self._store._sub(self.address, self.tokens, self.epoch)
        self.address = address
        self.epoch = self._store._add(address, self.tokens)

    def release(self) -> bool:
        """Remove this request's load; returns False if it was already released."""
        if self.released:
            return False
        self.released = True
        self._store._sub(self.address, self.tokens, self.epoch)
        return True


class Datastore:
    """The pool (and optional mirror pool) as epp currently sees it."""

    def __init__(self, pool_name: str = "", *, clock: Callable[[], float] | None = None) -> None:
        self.pool_name = pool_name
        self.mirror_name = ""
        self.engine = self.mirror_engine = "vllm"
        self._endpoints: tuple[Endpoint, ...] = ()
        self._mirror: tuple[Endpoint, ...] = ()
        self._by_address: dict[str, Endpoint] = {}
        self._metrics: dict[str, EndpointMetrics] = {}
        self._adapters: dict[str, set[str]] = {}  # adapter → addresses reporting it active
        self._requests: dict[str, int] = {}  # only endpoints with requests in flight
        self._tokens: dict[str, int] = {}
        # requests (and tokens) sent since the endpoint's last scrape: load its gauges cannot show yet
        self._unseen: dict[str, int] = {}
        self._unseen_tokens: dict[str, int] = {}
        self._epoch: dict[str, int] = {}
        self._policies: Mapping[str, ModelPolicy] | None = None
        self._objectives: dict[str, int] = {}
        self.synced = False
        self._listeners: list[Callable[[], None]] = []

    # ---- membership -------------------------------------------------------------------
    def set_pool(
        self,
        endpoints: Iterable[Endpoint],
        *,
        policies: Mapping[str, ModelPolicy] | None = None,
        objectives: Mapping[str, int] | None = None,
        mirror: Iterable[Endpoint] = (),
        pool_name: str | None = None,
        mirror_name: str = "",
        engine: str = "vllm",
        mirror_engine: str = "vllm",
    ) -> None:
        self._endpoints = tuple(endpoints)
        self._mirror = tuple(mirror)
        self._policies = dict(policies) if policies is not None else None
        self._objectives = dict(objectives or {})
        if pool_name is not None:
            self.pool_name = pool_name
        self.mirror_name = mirror_name
        self.engine, self.mirror_engine = engine, mirror_engine
        self._by_address = {e.address: e for e in (*self._endpoints, *self._mirror)}
        for address in list(self._metrics):
            if address not in self._by_address:
                self._index_adapters(address, self._metrics.pop(address).active_adapters, frozenset())
        self.synced = True
        for listener in self._listeners:
            listener()

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    def mirror_endpoints(self) -> tuple[Endpoint, ...]:
        return self._mirror

    def get(self, address: str) -> Endpoint | None:
        return self._by_address.get(address)

    def policies(self) -> Mapping[str, ModelPolicy] | None:
        return self._policies

    def objective_priority(self, name: str) -> int | None:
        return self._objectives.get(name)

    # ---- metrics ---------------------------------------------------------------------
    def set_metrics(self, address: str, metrics: EndpointMetrics) -> None:
        if address in self._by_address:
            old = self._metrics.get(address)
            self._metrics[address] = metrics
            if old is None or old.active_adapters != metrics.active_adapters:
                self._index_adapters(address, old.active_adapters if old else frozenset(), metrics.active_adapters)
            # a new scrape shows everything sent before it: start counting unseen load anew
            self._epoch[address] = self._epoch.get(address, 0) + 1
            self._unseen.pop(address, None)
            self._unseen_tokens.pop(address, None)

    def metrics(self, address: str) -> EndpointMetrics | None:
        return self._metrics.get(address)

    def endpoints_with_adapter(self, adapter: str) -> set[str]:
        """Addresses whose last scrape reported ``adapter`` active (any age)."""
        return self._adapters.get(adapter, set())

    def _index_adapters(self, address: str, old: frozenset[str], new: frozenset[str]) -> None:
        for a in old - new:
            holders = self._adapters.get(a)
            if holders is not None:
                holders.discard(address)
                if not holders:
                    del self._adapters[a]
        for a in new - old:
            self._adapters.setdefault(a, set()).add(address)

    def fresh_metrics(self, address: str, now: float, max_age: float) -> EndpointMetrics | None:
        """The endpoint's metrics if scraped within ``max_age`` seconds, else None (stale/unknown)."""
        m = self._metrics.get(address)
        return m if m is not None and now - m.updated_at <= max_age else None

    # ---- own load ----------------------------------------------------------------------
    def acquire(self, endpoint: Endpoint, tokens: int = 0) -> InflightTicket:
        return InflightTicket(self, endpoint.address, tokens)

    def inflight(self, address: str) -> int:
        return self._requests.get(address, 0)

    def inflight_counts(self) -> Mapping[str, int]:
        """Requests in flight per address (absent = 0); read-only view for schedulers."""
        return self._requests

    def note_mirror(self, address: str) -> None:
        """A mirrored copy was sent there: count it as unseen load until the next scrape.

        Envoy ignores shadow responses and ext_proc never sees them finish, so mirror
        load is known only from scrapes plus what was sent since.
        """
        self._unseen[address] = self._unseen.get(address, 0) + 1
        self._unseen_tokens.setdefault(address, 0)

    def unseen_counts(self) -> Mapping[str, int]:
        """Requests in flight sent after the endpoint's last scrape (absent = 0)."""
        return self._unseen

    def unseen_token_counts(self) -> Mapping[str, int]:
        return self._unseen_tokens

    def inflight_token_counts(self) -> Mapping[str, int]:
        """Estimated prompt tokens in flight per address (absent = 0)."""
        return self._tokens

    def inflight_tokens(self, address: str) -> int:
        return self._tokens.get(address, 0)

    def total_inflight(self) -> int:
        return sum(self._requests.values())

    def _add(self, address: str, tokens: int) -> int:
        _bump(self._requests, self._tokens, address, 1, tokens)
        _bump(self._unseen, self._unseen_tokens, address, 1, tokens)
        return self._epoch.get(address, 0)

    def _sub(self, address: str, tokens: int, epoch: int) -> None:
        if epoch == self._epoch.get(address, 0) and address in self._unseen:  # finished before any scrape saw it
            _bump(self._unseen, self._unseen_tokens, address, -1, -tokens)
        _bump(self._requests, self._tokens, address, -1, -tokens)


def _bump(requests: dict[str, int], tokens: dict[str, int], address: str, dr: int, dt: int) -> None:
    """Add to a pair of per-address counters; an address whose request count reaches 0 is dropped."""
    left = requests.get(address, 0) + dr
    if left:
        requests[address] = left
        tokens[address] = tokens.get(address, 0) + dt
    else:
        requests.pop(address, None)
        tokens.pop(address, None)
