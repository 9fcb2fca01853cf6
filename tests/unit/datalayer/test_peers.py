"""Active-active peers (``epp/datalayer/peers.py``): PeerSync's messages between two replicas'
ledgers, PeerLoad's sums, and a scheduler that adds its peers' load (no sockets here)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import msgpack
import pytest

from epp.datalayer.kvevents import KVEventIndex
from epp.datalayer.ledger import LoadLedger
from epp.datalayer.peers import PeerLoad, PeerSync
from epp.domain import Endpoint
from epp.scheduling import build_scheduler
from epp.scheduling.blockkeys import BlockKeys
from epp_sim.kvevents import BlockStored, encode_batch, frames

from support.scheduling import EPS, m, req, store_with

E1, E2, E3 = (Endpoint(f"10.0.0.{i}:8000", f"pod-{i}") for i in (1, 2, 3))


class Clock:
    """A hand-advanced clock (``PeerSync(now=...)``, ``KVEventIndex(now=...)``)."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def pair(ledger: LoadLedger | None = None, **kw) -> tuple[PeerSync, PeerSync]:
    """Replica "a" (on ``ledger``) and replica "b" (an empty ledger)."""
    return PeerSync(ledger or LoadLedger(), replica_id="a"), PeerSync(LoadLedger(), replica_id="b", **kw)


def view(sync: PeerSync) -> tuple[dict[str, int], ...]:
    load = sync.load
    return dict(load.requests), dict(load.tokens), dict(load.unseen), dict(load.unseen_tokens)


EMPTY: tuple[dict[str, int], ...] = ({}, {}, {}, {})


# ---- PeerSync: encode / apply --------------------------------------------------------------------


def test_load_round_trips_between_two_replicas() -> None:
    ledger = LoadLedger()
    ledger.acquire(E1, 100)
    ledger.acquire(E1, 50)
    ledger.acquire(E2, 10)
    ledger.scraped(E2.address)  # E2's request is now seen by a scrape: in flight, not unseen
    ledger.note_mirror(E3.address)  # a mirrored copy: unseen, never in flight
    a, b = pair(ledger)
    assert b.apply(a.encode()) is True
    assert view(b) == (
        {E1.address: 2, E2.address: 1},
        {E1.address: 150, E2.address: 10},
        {E1.address: 2, E3.address: 1},
        {E1.address: 150},  # the mirror's unknown token count (0) adds nothing
    )
    assert b.load.peers == ["a"] and b.load.total_requests() == 3
    assert (a.stats.sent, b.stats.received) == (1, 1)


def test_a_later_message_replaces_and_releases_reach_the_peer() -> None:
    ledger = LoadLedger()
    tickets = [ledger.acquire(E1, 10), ledger.acquire(E1, 10), ledger.acquire(E2, 5)]
    a, b = pair(ledger)
    b.apply(a.encode())
    assert view(b) == ({E1.address: 2, E2.address: 1}, {E1.address: 20, E2.address: 5},
                       {E1.address: 2, E2.address: 1}, {E1.address: 20, E2.address: 5})  # fmt: skip
    tickets[0].release()
    b.apply(a.encode())
    assert view(b) == ({E1.address: 1, E2.address: 1}, {E1.address: 10, E2.address: 5},
                       {E1.address: 1, E2.address: 1}, {E1.address: 10, E2.address: 5})  # fmt: skip
    for t in tickets[1:]:
        t.release()
    b.apply(a.encode())
    assert view(b) == EMPTY  # nothing leaks
    assert b.load.total_requests() == 0 and b.load.peers == ["a"]  # still a live peer, with no load


def test_an_older_message_changes_nothing() -> None:
    ledger = LoadLedger()
    ledger.acquire(E1)
    a, b = pair(ledger)
    old = a.encode()
    ledger.acquire(E1)
    new = a.encode()
    b.apply(new)
    assert b.apply(old) is True  # heard (the peer is alive), but its state is stale
    assert b.load.requests == {E1.address: 2}


def test_older_messages_after_a_newer_one_change_nothing() -> None:
    ledger = LoadLedger()
    a, b = pair(ledger)
    messages = []
    for _ in range(3):
        ledger.acquire(E1)
        messages.append(a.encode())  # 1, 2 and 3 requests
    b.apply(messages[2])
    b.apply(messages[0])
    b.apply(messages[1])
    assert b.load.requests == {E1.address: 3}


def test_own_messages_are_ignored() -> None:
    ledger = LoadLedger()
    ledger.acquire(E1)
    a = PeerSync(ledger, replica_id="a")
    assert a.apply(a.encode()) is False
    assert a.stats.own == 1 and a.stats.received == 0
    assert view(a) == EMPTY and a.load.peers == []  # its own load is not counted twice


def test_a_random_replica_id_tells_two_replicas_apart() -> None:
    one, two = PeerSync(LoadLedger()), PeerSync(LoadLedger())
    assert one.replica_id != two.replica_id
    assert two.apply(one.encode()) is True and two.stats.own == 0


def _valid(seq: int, load: object, spec: list | None = None, full: object = True) -> bytes:
    return msgpack.packb([1, "a", seq, full, load, spec or []])


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        msgpack.packb("hello"),
        msgpack.packb({"version": 1}),
        msgpack.packb([1, "a", 9, True, {}]),
        msgpack.packb([2, "a", 9, True, {}, []]),
        msgpack.packb([1, 7, 9, True, {}, []]),
        msgpack.packb([1, "a", "9", True, {}, []]),
        _valid(9, {}, full="yes"),
        _valid(9, [["x", [1, 2, 3, 4]]]),
        _valid(9, {"x": [1, 2]}),
        _valid(9, {"x": ["one", 0, 0, 0]}),
        _valid(9, {"x": [-1000, 0, 0, 0]}),
        _valid(9, {"x": [1 << 41, 0, 0, 0]}),
        _valid(9, {"x": [math.inf, 0, 0, 0]}),
        _valid(9, {f"10.0.{i // 250}.{i % 250}:1": [1, 0, 0, 0] for i in range(65_537)}),
        _valid(9, {}) + b"\x00",
    ],
    ids=["not-msgpack", "a-string", "a-map", "five-fields", "version-2", "peer-not-a-string", "seq-not-an-int",
         "full-not-a-bool", "load-not-a-map", "load-entry-short", "load-count-not-a-number", "negative-count",
         "absurd-count", "infinite-count", "too-many-addresses", "trailing-bytes"],
)  # fmt: skip
def test_malformed_payloads_are_rejected_without_changing_anything(payload) -> None:
    ledger = LoadLedger()
    ledger.acquire(E1, 7)
    a, b = pair(ledger)
    b.apply(a.encode())
    before = view(b)
    assert b.apply(payload) is False
    assert b.stats.rejected == 1 and b.stats.received == 1
    assert view(b) == before and b.load.peers == ["a"]
    assert b.apply(_valid(10, {E2.address: [1, 0, 0, 0]})) is True  # seq 9 was not taken: 10 still applies
    assert b.load.requests == {E2.address: 1}


def test_a_silent_peer_expires_with_everything_it_said() -> None:
    clock = Clock()
    ledger = LoadLedger()
    ledger.acquire(E1)
    a, b = pair(ledger, now=clock, peer_timeout=3.0)
    b.apply(a.encode())
    clock.t += 2.0
    b.apply(a.encode())  # heard again: the timeout counts from here
    clock.t += 2.9
    assert b.expire() == [] and b.load.requests == {E1.address: 1}
    clock.t += 0.2  # 3.1 s of silence
    assert b.expire() == ["a"]
    assert view(b) == EMPTY and b.load.peers == [] and b.stats.expired == 1
    assert b.expire() == []  # once
    b.apply(a.encode())  # it speaks again: its changes count at once (none here) ...
    assert b.load.peers == ["a"] and not b.load.requests
    b.apply(a.encode(full=True))  # ... and its whole load with its next full message (at most a second later)
    assert b.load.requests == {E1.address: 1}


def test_dirty_until_encoded_and_again_after_a_ledger_change() -> None:
    ledger = LoadLedger()
    a = PeerSync(ledger, replica_id="a")
    assert a.dirty  # nothing sent yet
    a.encode()
    assert not a.dirty
    changes: list[Callable[[], object]] = [
        lambda: ledger.acquire(E1, 3),
        lambda: ledger.scraped(E1.address),
        lambda: ledger.note_mirror(E2.address),
    ]
    for change in changes:
        change()
        assert a.dirty
        a.encode()
        assert not a.dirty
    ticket = ledger.acquire(E1)
    a.encode()
    ticket.release()
    assert a.dirty


# ---- speculative entries travel ------------------------------------------------------------------


def reporting_index(clock: Clock) -> KVEventIndex:
    """An index where E1 has published one block (its block size, 16, is known)."""
    idx = KVEventIndex(BlockKeys(), now=clock)
    stored = BlockStored((1,), None, tuple(range(16)), 16)
    idx.apply(E1.address, frames(f"kv@{E1.address}@m".encode(), 0, encode_batch(0.0, [stored])))
    return idx


def test_speculative_entries_reach_the_peer_once_and_stop_there() -> None:
    clock = Clock()
    ia, ib, ic = (reporting_index(clock) for _ in range(3))
    a = PeerSync(LoadLedger(), ia, replica_id="a")
    b = PeerSync(LoadLedger(), ib, replica_id="b")
    c = PeerSync(LoadLedger(), ic, replica_id="c")
    a.encode(), b.encode()
    keys = [11, 12, 13]
    assert ia.speculate(E1.address, keys, 2.0) is True  # a's own pick: on_speculate was wired by PeerSync
    assert a.dirty  # the ledger did not move, the entry is news
    b.apply(a.encode())
    assert ib.leading_run(E1.address, keys) == 3
    assert (a.stats.spec_sent, b.stats.spec_received, ib.stats.speculated) == (1, 1, 1)
    assert not b.dirty  # a peer's entry is not news to b's peers
    c.apply(b.encode())
    assert ic.leading_run(E1.address, keys) == 0 and c.stats.spec_received == 0
    c.apply(a.encode())  # a's next message: the entry was sent once
    assert ic.leading_run(E1.address, keys) == 0 and c.stats.spec_received == 0
    clock.t += 2.1  # the ttl travelled with the entry
    assert ib.leading_run(E1.address, keys) == 0


# ---- PeerLoad ------------------------------------------------------------------------------------


def test_peer_load_sums_over_peers_and_drop_subtracts() -> None:
    load = PeerLoad()
    load.set("a", {E1.address: (2, 20, 1, 10)})
    load.set("b", {E1.address: (3, 30, 0, 0), E2.address: (1, 5, 1, 5)})
    assert (dict(load.requests), dict(load.tokens), dict(load.unseen), dict(load.unseen_tokens)) == (
        {E1.address: 5, E2.address: 1},
        {E1.address: 50, E2.address: 5},
        {E1.address: 1, E2.address: 1},
        {E1.address: 10, E2.address: 5},
    )
    assert load.total_requests() == 6 and load.peers == ["a", "b"]
    load.drop("a")
    assert (dict(load.requests), dict(load.tokens), dict(load.unseen), dict(load.unseen_tokens)) == (
        {E1.address: 3, E2.address: 1},
        {E1.address: 30, E2.address: 5},
        {E2.address: 1},
        {E2.address: 5},
    )
    load.drop("nobody")
    load.set("b", {E2.address: (1, 5, 1, 5)})  # replaces what b said before
    assert dict(load.requests) == {E2.address: 1} and load.peers == ["b"]
    load.drop("b")
    assert (dict(load.requests), dict(load.tokens), dict(load.unseen), dict(load.unseen_tokens)) == EMPTY


# ---- the scheduler adds the peers' load ------------------------------------------------------------


def test_snapshot_adds_the_peers_load_to_the_own() -> None:
    store_a, store_b = store_with([m(), m()]), store_with([m(), m()])
    for _ in range(5):
        store_a.load.acquire(EPS[0], 100)
    store_b.load.acquire(EPS[0], 10)
    a, b = PeerSync(store_a.load, replica_id="a"), PeerSync(store_b.load, replica_id="b")
    b.apply(a.encode())
    s = build_scheduler("least-inflight", store_b, rng=random.Random(0), peers=b.load)
    c = s.snapshot(req(), EPS[:2])
    assert (c.inflight, c.inflight_tokens, c.unseen, c.unseen_tokens) == ([6, 0], [510, 0], [6, 0], [510, 0])


@pytest.mark.parametrize("profile", ["least-inflight", "epp-default"])
def test_a_replica_avoids_the_pod_its_peer_loaded(profile) -> None:
    store_a, store_b = store_with([m(), m()]), store_with([m(), m()])
    for _ in range(5):
        store_a.load.acquire(EPS[0])
    a, b = PeerSync(store_a.load, replica_id="a"), PeerSync(store_b.load, replica_id="b")
    b.apply(a.encode())
    assert store_b.load.requests == {}  # b itself sent nothing
    alone = build_scheduler(profile, store_b, rng=random.Random(0))
    assert {alone.schedule(req(), EPS[:2])[0].address for _ in range(10)} == {EPS[0].address, EPS[1].address}
    synced = build_scheduler(profile, store_b, rng=random.Random(0), peers=b.load)
    assert {synced.schedule(req(), EPS[:2])[0].address for _ in range(10)} == {EPS[1].address}


@pytest.mark.parametrize(
    "entry",
    [[E1.address, math.inf, [1, 2]], [E1.address, math.nan, [1, 2]], [E1.address, -1.0, [1, 2]],
     [E1.address, 0.0, [1, 2]], [E1.address, "soon", [1]], [E1.address, 2.0], [E1.address, 2.0, ["k"]],
     [E1.address, 2.0, [math.inf]], [E1.address, 2.0, [-1]], [E1.address, 2.0, list(range(4097))]],
    ids=["inf-ttl", "nan-ttl", "negative-ttl", "zero-ttl", "ttl-not-a-number", "entry-short", "key-not-an-int",
         "key-inf", "key-negative", "too-many-keys"],
)  # fmt: skip
def test_a_bad_speculative_entry_is_skipped_and_the_load_still_counts(entry: list) -> None:
    """A speculative entry must expire and name 64-bit keys: a bad one is dropped alone (the
    message's load still counts, and the good entries beside it still apply)."""
    index = KVEventIndex(BlockKeys(), now=Clock())
    index.apply(E1.address, frames(b"kv@x@m", 0, encode_batch(0.0, [BlockStored((1,), None, tuple(range(16)), 16)])))
    b = PeerSync(LoadLedger(), index)
    good = [E1.address, 2.0, [7, 8]]
    payload = msgpack.packb([1, "peer", 1, True, {E2.address: [3, 0, 0, 0]}, [entry, good]])
    assert b.apply(payload) is True and b.stats.rejected == 0
    assert b.stats.spec_rejected == 1 and b.stats.spec_received == 1
    assert b.load.requests == {E2.address: 3} and index.leading_run(E1.address, [7, 8]) == 2


def test_between_full_messages_only_changed_addresses_travel() -> None:
    """A message carries every address only when full; otherwise the addresses that changed,
    with zeros for one that has nothing left, and the peer's view is the same either way."""
    ledger = LoadLedger()
    a, b = pair(ledger)
    tickets = [ledger.acquire(e, 10) for e in (E1, E2, E3)]
    b.apply(a.encode())  # the first message is full
    tickets[0].release()
    delta = a.encode()
    assert msgpack.unpackb(delta, strict_map_key=False)[3:5] == [False, {E1.address: [0, 0, 0, 0]}]
    b.apply(delta)
    assert dict(b.load.requests) == {E2.address: 1, E3.address: 1}
    full = msgpack.unpackb(a.encode(full=True), strict_map_key=False)
    assert full[3] is True and set(full[4]) == {E2.address, E3.address}


def test_a_lost_change_is_repaired_by_the_next_full_message() -> None:
    ledger = LoadLedger()
    a, b = pair(ledger)
    ticket = ledger.acquire(E1, 10)
    b.apply(a.encode())
    ticket.release()
    a.encode()  # lost on the way
    assert dict(b.load.requests) == {E1.address: 1}  # stale until the next full message
    b.apply(a.encode(full=True))
    assert not b.load.requests


def test_an_ignored_message_does_not_keep_a_peer_alive() -> None:
    """A message with a sequence number far ahead (a spoofed or broken sender) is taken once;
    the real sender's messages are then ignored, but they do not refresh the peer either, so it
    expires and is learned afresh from its next message."""
    clock = Clock()
    ledger = LoadLedger()
    a, b = pair(ledger, now=clock, peer_timeout=3.0)
    ledger.acquire(E1)
    b.apply(a.encode())
    b.apply(msgpack.packb([1, a.replica_id, 1 << 62, True, {}, []]))
    assert not b.load.requests
    clock.t += 2.0
    b.apply(a.encode(full=True))  # ignored: older than 2**62
    assert not b.load.requests
    clock.t += 1.1
    assert b.expire() == [a.replica_id]
    b.apply(a.encode(full=True))
    assert b.load.requests == {E1.address: 1}


def test_a_ledger_keeps_no_changed_set_without_peers() -> None:
    ledger = LoadLedger()
    ledger.acquire(E1).release()
    assert ledger.changed is None
    PeerSync(ledger)
    ledger.acquire(E2)
    assert ledger.changed == {E2.address}


def test_forgetting_an_endpoint_with_unseen_load_is_a_change_for_peers() -> None:
    ledger = LoadLedger()
    a, b = pair(ledger)
    ledger.note_mirror(E1.address)
    b.apply(a.encode())
    assert b.load.unseen == {E1.address: 1}
    ledger.forget(E1.address)
    b.apply(a.encode())
    assert not b.load.unseen
