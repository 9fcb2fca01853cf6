"""The load ledger (``epp/datalayer/ledger.py``): in-flight tickets and the unseen count, via a datastore."""

from __future__ import annotations

from epp.domain import Endpoint, EndpointMetrics

from support import datastore, pool

A, B, C = Endpoint("10.0.0.1:80", "a"), Endpoint("10.0.0.2:80", "b"), Endpoint("10.0.0.3:80", "c")


def test_ticket_releases_exactly_once():
    store = datastore([A, B])
    t = store.load.acquire(A, tokens=10)
    assert (store.load.inflight(A.address), store.load.tokens[A.address]) == (1, 10)
    assert t.release() is True
    assert t.release() is False
    assert store.load.total_inflight() == 0 and A.address not in store.load.tokens


def test_ticket_moves_to_served_endpoint():
    store = datastore([A, B])
    t = store.load.acquire(A, tokens=5)
    t.move_to(B.address)
    assert store.load.inflight(A.address) == 0 and store.load.inflight(B.address) == 1
    t.release()
    t.move_to(A.address)  # after release: no effect
    assert store.load.total_inflight() == 0


def test_release_after_endpoint_left_the_pool():
    store = datastore([A, B])
    t = store.load.acquire(B)
    store.set_pool(pool([A]))
    assert store.get(B.address) is None and store.load.inflight(B.address) == 1
    t.release()
    assert store.load.total_inflight() == 0 and store.load.unseen == {}


def test_unseen_load_counts_requests_sent_since_the_last_scrape():
    store = datastore([A, B])
    early = store.load.acquire(A, tokens=10)
    assert store.load.unseen == {A.address: 1} and store.load.unseen_tokens == {A.address: 10}
    store.set_metrics(A.address, EndpointMetrics(waiting=1))  # the scrape now shows it
    assert store.load.unseen == {}
    late = store.load.acquire(A, tokens=5)
    assert store.load.unseen == {A.address: 1}
    early.release()  # seen by the scrape: not in the unseen count
    assert store.load.unseen == {A.address: 1}
    late.release()  # finished before any scrape saw it
    assert store.load.unseen == {} and store.load.total_inflight() == 0
