"""Configuration (``epp/config.py``): Go-style durations and bools, the pool file and its errors."""

from __future__ import annotations

import pytest

from epp.config import parse_bool, parse_duration, parse_pool_file
from epp.domain import Criticality, FailureMode
from epp.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("50ms", 0.05), ("2s", 2.0), ("1m", 60.0), ("1m30s", 90.0), ("1.5s", 1.5), ("0", 0.0), ("250us", 0.00025)],
)
def test_durations_are_parsed_as_go_writes_them(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "fast", "5 s", "1d"])
def test_bad_durations_are_rejected(text):
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


def test_bools_accept_go_spellings():
    assert parse_bool("true") and parse_bool("1") and not parse_bool("false") and not parse_bool("F")
    with pytest.raises(ConfigError):
        parse_bool("maybe")


def test_pool_file_full_example_parses():
    pf = parse_pool_file(
        """
pool:
  name: vllm-llama2-7b-pool
  engine: vllm
  endpoints: ["127.0.0.1:8001", {address: "127.0.0.1:8002", name: pod-b}]
models:
  - modelName: /model/llama2
    criticality: Critical
    targetModels: [{name: /model/llama2, weight: 100}]
mirror:
  name: vllm-llama2-7b-pool-1
  endpoints: ["127.0.0.1:8101"]
"""
    )
    eps = pf.pool.endpoint_list()
    assert [e.address for e in eps] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert eps[1].name == "pod-b" and eps[0].name == "vllm-llama2-7b-pool-0"
    policies = pf.policies()
    assert policies.models is not None
    policy = policies.models["/model/llama2"]
    assert policy.criticality is Criticality.CRITICAL and policy.targets[0].weight == 100
    assert pf.mirror is not None and pf.mirror.endpoint_list()[0].port == 8101
    assert pf.pool.failure_mode is FailureMode.FAIL_CLOSE
    pool = pf.pool.to_pool()
    assert (pool.name, pool.namespace, pool.endpoints) == ("vllm-llama2-7b-pool", "default", tuple(eps))


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("pool: {name: p, endpoints: [nope]}", "pool.endpoints"),
        ("pool: {name: p, endpoints: ['1.2.3.4:1', '1.2.3.4:1']}", "pool.endpoints"),
        ("pool: {name: p, engine: tgi}", "pool.engine"),
        ("pool: {endpoints: []}", "pool.name"),
        ("pool: {name: p, colour: red}", "pool.colour"),
        ("pool: {name: p}\nmodels: [{modelName: m, criticality: Urgent}]", "models[0].criticality"),
        ("pool: {name: p}\nmodels: [{modelName: m, targetModels: [{name: t, weight: -1}]}]",
         "models[0].targetModels[0].weight"),
        ("pool: {name: p}\nmodels: [{modelName: m}, {modelName: m}]", "models"),
        ("pool: {name: p, failureMode: Sometimes}", "pool.failureMode"),
        ("[1, 2]", "mapping"),
        ("pool: {name: p", "YAML"),
    ],
)
def test_bad_pool_files_give_one_line_naming_the_field(text, field):
    with pytest.raises(ConfigError) as info:
        parse_pool_file(text, "pool.yaml")
    msg = str(info.value)
    assert "\n" not in msg and field in msg and msg.startswith("pool.yaml")
