"""Routing (``epp/routing.py``): subset hints, target models, body rewrite, shedding by objective."""

from __future__ import annotations

import math
import random

import pytest

from epp.domain import Criticality, Endpoint, InferenceRequest, ModelPolicy, TargetModel
from epp.errors import ModelNotFound, NoEndpoints, PathNotAllowed, Shed
from epp.routing import Router, choose_target, filter_subset, parse_subset
from epp.scheduling import build_scheduler

from support import datastore
from support.scheduling import m, store_with

EPS = [Endpoint("10.0.0.1:8000", "a"), Endpoint("10.0.0.1:8001", "b"), Endpoint("10.0.0.2:8000", "c")]


def req(model: str = "m", **kw: object) -> InferenceRequest:
    return InferenceRequest(request_id="r", model=model, target_model=model, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        (None, ["a", "b", "c"]),
        ([], []),
        (["10.0.0.1"], ["a", "b"]),
        (["10.0.0.1:8001"], ["b"]),
        ("10.0.0.2:8000, 10.0.0.1:8000", ["a", "c"]),
        (["10.9.9.9"], []),
        ([1, "10.0.0.2"], ["c"]),
        (42, []),
    ],
    ids=["absent", "empty", "ip", "ip-port", "comma-string", "no-match", "non-strings-skipped", "wrong-type"],
)
def test_subset_hint(hint, expected):
    assert [e.name for e in filter_subset(EPS, parse_subset(hint))] == expected


def test_weighted_target_split_is_within_4_5_sigma():
    rng = random.Random(1)
    targets = (TargetModel("x", 30), TargetModel("y", 70))
    n = 1000
    xs = sum(choose_target(targets, rng) == "x" for _ in range(n))
    sigma = math.sqrt(n * 0.3 * 0.7)
    assert abs(xs - 300) <= 4.5 * sigma


def test_zero_weights_are_uniform_and_no_targets_is_none():
    rng = random.Random(2)
    picks = {choose_target((TargetModel("x", 0), TargetModel("y", 0)), rng) for _ in range(50)}
    assert picks == {"x", "y"} and choose_target((), rng) is None


def make_router(policies=None, endpoints=EPS, **kw):
    store = datastore(endpoints, models=policies)
    sched = build_scheduler("least-inflight", store, rng=random.Random(3), max_endpoints=2)
    return Router(store, sched, **kw), store


def test_model_policy_rewrites_body_and_sets_criticality():
    router, _ = make_router({"m": ModelPolicy("m", Criticality.CRITICAL, (TargetModel("t", 1),))})
    pick = router.route(req())
    assert pick.target_model == "t"  # the transport rewrites the body (openai.rewrite_model)
    assert len(pick.endpoints) == 2  # primary + one fallback


def test_unknown_model_404_only_when_models_are_declared():
    router, _ = make_router({"m": ModelPolicy("m")})
    with pytest.raises(ModelNotFound):
        router.route(req("other"))
    open_router, _ = make_router(None)
    assert open_router.route(req("other")).target_model == "other"


def test_a_clients_rewrite_header_is_ignored_unless_the_operator_trusts_it():
    router, _ = make_router({"m": ModelPolicy("m")})
    pick = router.route(req(model_rewrite="evil-model"))
    assert pick.target_model == "m"  # the allowlist holds
    trusting, _ = make_router(None, trust_model_rewrite_header=True)
    pick = trusting.route(req(model_rewrite="lora-x"))
    assert pick.target_model == "lora-x"


@pytest.mark.parametrize(
    ("path", "blocked"),
    [
        ("/v1/load_lora_adapter", True),
        ("/v1/unload_lora_adapter?x=1", True),
        ("/metrics", True),
        ("/metrics/", True),
        ("/sleep", True),
        ("/v1/completions", False),
        ("/v1/chat/completions", False),
        ("/v1/models", False),
        ("/metricsfoo", False),
    ],
)
def test_admin_paths_are_not_routed(path, blocked):
    router, store = make_router(None)
    request = req(headers={":path": path})
    if blocked:
        with pytest.raises(PathNotAllowed) as err:
            router.check_path(path)
        assert err.value.http_status == 403 and store.load.total_inflight() == 0
    else:
        router.check_path(path)
        assert router.route(request).primary in EPS
    open_router, _ = make_router(None, blocked_paths=())
    open_router.check_path(path)  # an operator may route them
    assert open_router.route(request).primary in EPS


def test_an_unknown_models_name_is_clipped_in_the_error():
    router, _ = make_router({"m": ModelPolicy("m")})
    huge = "x" * 1_000_000
    with pytest.raises(ModelNotFound) as err:
        router.route(req(huge))
    assert len(err.value.message) < 300 and "chars)" in err.value.message


def test_no_endpoints():
    router, _ = make_router(None, endpoints=[])
    with pytest.raises(NoEndpoints):
        router.route(req())


def test_least_inflight_prefers_idle_endpoints():
    router, store = make_router(None)
    store.load.acquire(EPS[0])
    store.load.acquire(EPS[1])
    assert router.route(req()).primary.name == "c"


@pytest.mark.parametrize(("objective", "shed"), [("batch", True), ("chat", False), ("unknown", False), (None, False)])
def test_shedding_by_objective_priority(objective, shed):
    store = store_with([m(waiting=9), m(waiting=9)])  # saturated; objective "batch" has priority -1
    router = Router(store, build_scheduler("epp-default", store))
    r = req("base", objective=objective or "")
    if shed:
        with pytest.raises(Shed):
            router.route(r)
    else:
        assert router.route(r).primary in store.endpoints()


def test_model_criticality_from_policy_sheds():
    store = store_with([m(waiting=9)], models={"base": ModelPolicy("base", Criticality.SHEDDABLE)})
    router = Router(store, build_scheduler("epp-default", store))
    with pytest.raises(Shed):
        router.route(req("base"))


def test_a_model_goes_only_where_it_is_served_or_unknown():
    router, store = make_router(None)
    a, b, c = EPS
    store.set_served_models(a.address, frozenset({"m", "sql-lora"}))
    store.set_served_models(b.address, frozenset({"m"}))
    assert {router.route(req("sql-lora")).primary for _ in range(30)} == {a, c}  # c: unknown
    store.set_served_models(c.address, frozenset({"m"}))
    assert {router.route(req("sql-lora")).primary for _ in range(30)} == {a}
    assert len({router.route(req("m")).primary for _ in range(30)}) == 3
    assert {router.route(req("other")).primary for _ in range(30)} == {a, b, c}  # nobody: as before
