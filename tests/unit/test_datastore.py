from __future__ import annotations

from epp.datalayer import Datastore
from epp.domain import Endpoint

A, B = Endpoint("10.0.0.1:80", "a"), Endpoint("10.0.0.2:80", "b")


def test_ticket_releases_exactly_once():
    store = Datastore("p")
    store.set_pool([A, B])
    t = store.acquire(A, tokens=10)
    assert (store.inflight(A.address), store.inflight_tokens(A.address)) == (1, 10)
    assert t.release() is True
    assert t.release() is False
    assert store.total_inflight() == 0 and store.inflight_tokens(A.address) == 0


def test_ticket_moves_to_served_endpoint():
    store = Datastore("p")
    store.set_pool([A, B])
    t = store.acquire(A, tokens=5)
    t.move_to(B.address)
    assert store.inflight(A.address) == 0 and store.inflight(B.address) == 1
    t.release()
    t.move_to(A.address)  # after release: no effect
    assert store.total_inflight() == 0


def test_release_after_endpoint_left_the_pool():
    store = Datastore("p")
    store.set_pool([A, B])
    t = store.acquire(B)
    store.set_pool([A])
    assert store.get(B.address) is None and store.inflight(B.address) == 1
    t.release()
    assert store.total_inflight() == 0


def test_change_listeners_and_synced():
    store = Datastore()
    calls = []
    store.on_change(lambda: calls.append(len(store.endpoints())))
    assert not store.synced
    store.set_pool([A], pool_name="p")
    assert store.synced and calls == [1] and store.pool_name == "p"


def test_unseen_load_counts_requests_sent_since_the_last_scrape():
    from epp.domain import EndpointMetrics

    store = Datastore("p")
    store.set_pool([A, B])
    early = store.acquire(A, tokens=10)
    assert store.unseen_counts() == {A.address: 1} and store.unseen_token_counts() == {A.address: 10}
    store.set_metrics(A.address, EndpointMetrics(waiting=1))  # the scrape now shows it
    assert store.unseen_counts() == {}
    late = store.acquire(A, tokens=5)
    assert store.unseen_counts() == {A.address: 1}
    early.release()  # seen by the scrape: not in the unseen count
    assert store.unseen_counts() == {A.address: 1}
    late.release()  # finished before any scrape saw it
    assert store.unseen_counts() == {} and store.total_inflight() == 0
