"""The load ledger: what epp itself has sent to each endpoint and not yet seen finish.

Scraped gauges lag by up to one scrape interval; a burst arriving between two scrapes
would all see the same "least loaded" endpoint.  The ledger counts, per address:

* requests and estimated prompt tokens in flight (claimed by :meth:`LoadLedger.acquire`,
  released exactly once by :meth:`InflightTicket.release`, even if the endpoint left the
  pool meanwhile), and
* the *unseen* part of that: requests sent since the endpoint's last scrape, which its
  gauges cannot show yet, plus mirrored copies (Envoy never reports their end).

Addresses with nothing counted are absent from the maps.  The views handed out are
read-only.  Synchronous, event-loop thread only: no locks.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from epp.domain import Endpoint


class InflightTicket:
    """One request's claim on an endpoint; released exactly once."""

    __slots__ = ("_ledger", "address", "epoch", "released", "tokens")

    def __init__(self, ledger: LoadLedger, address: str, tokens: int) -> None:
        self._ledger = ledger
        self.address = address
        self.tokens = tokens
        self.released = False
        self.epoch = ledger._add(address, tokens)

    def move_to(self, address: str) -> None:
        """Account the request to another endpoint (Envoy served a fallback)."""
        if self.released or address == self.address:
            return
        self._ledger._sub(self.address, self.tokens, self.epoch)
        self.address = address
        self.epoch = self._ledger._add(address, self.tokens)

    def release(self) -> bool:
        """Remove this request's load; returns False if it was already released."""
        if self.released:
            return False
        self.released = True
        self._ledger._sub(self.address, self.tokens, self.epoch)
        return True


class LoadLedger:
    """Per-address counts of epp's own in-flight and unseen load."""

    def __init__(self) -> None:
        self._requests: dict[str, int] = {}
        self._tokens: dict[str, int] = {}
        self._unseen: dict[str, int] = {}
        self._unseen_tokens: dict[str, int] = {}
        self._epoch: dict[str, int] = {}  # scrapes seen per address: tells unseen from seen load
        # addresses whose counts moved since peers were last told; None: no peers (nothing kept)
        self.changed: set[str] | None = None
        self.requests: Mapping[str, int] = MappingProxyType(self._requests)
        self.tokens: Mapping[str, int] = MappingProxyType(self._tokens)
        self.unseen: Mapping[str, int] = MappingProxyType(self._unseen)
        self.unseen_tokens: Mapping[str, int] = MappingProxyType(self._unseen_tokens)

    def acquire(self, endpoint: Endpoint, tokens: int = 0) -> InflightTicket:
        return InflightTicket(self, endpoint.address, tokens)

    def inflight(self, address: str) -> int:
        return self._requests.get(address, 0)

    def total_inflight(self) -> int:
        return sum(self._requests.values())

    def scraped(self, address: str) -> None:
        """A new scrape shows everything sent before it: start counting unseen load anew."""
        self._epoch[address] = self._epoch.get(address, 0) + 1
        if self._unseen.pop(address, None) is not None and self.changed is not None:
            self.changed.add(address)
        self._unseen_tokens.pop(address, None)

    def forget(self, address: str) -> None:
        """The endpoint left every pool: drop its history, unless claims on it are still in flight."""
        if address not in self._requests:
            self._epoch.pop(address, None)
            if self._unseen.pop(address, None) is not None and self.changed is not None:
                self.changed.add(address)
            self._unseen_tokens.pop(address, None)

    def note_mirror(self, address: str) -> None:
        """A mirrored copy was sent there: unseen load until the next scrape.

        Envoy ignores shadow responses and ext_proc never sees them finish, so mirror
        load is known only from scrapes plus what was sent since.
        """
        self._unseen[address] = self._unseen.get(address, 0) + 1
        self._unseen_tokens.setdefault(address, 0)
        if self.changed is not None:
            self.changed.add(address)

    def _add(self, address: str, tokens: int) -> int:
        if self.changed is not None:
            self.changed.add(address)
        _bump(self._requests, self._tokens, address, 1, tokens)
        _bump(self._unseen, self._unseen_tokens, address, 1, tokens)
        return self._epoch.get(address, 0)

    def _sub(self, address: str, tokens: int, epoch: int) -> None:
        if self.changed is not None:
            self.changed.add(address)
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
