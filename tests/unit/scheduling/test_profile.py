"""Profiles (``epp/scheduling/profile.py``): EndpointPickerConfig YAML to a built profile."""

from __future__ import annotations

import random

import pytest

from epp.errors import ConfigError
from epp.scheduling import parse_config
from epp.scheduling.profile import build_profile
from epp.scheduling.scorers import GuardedAffinityScorer


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("plugins: [{type: no-such-scorer}]", "unknown plugin type 'no-such-scorer'"),
        ("plugins: [{type: queue-scorer}, {type: queue-scorer}]", "duplicate plugin name 'queue-scorer'"),
        ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer, "
         "weight: -1}]}]", "weight"),
        ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer, "
         "weight: heavy}]}]", "weight"),
        ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: d, plugins: [{pluginRef: nope}]}]",
         "unknown plugin 'nope'"),
        ("plugins: [{type: random-picker}, {type: max-score-picker}]", "2 pickers"),
        ("plugins: [{type: max-score-picker}]\nschedulingProfiles: [{name: d, plugins: [{pluginRef: "
         "max-score-picker, weight: 2}]}]", "not a scorer"),
        ("plugins: [{type: queue-scorer, colour: red}]", "colour"),
        ("plugins: [{type: prefix-cache-scorer, parameters: {affinityMaxExtraLoad: lots}}]", "affinityMaxExtraLoad"),
        ("plugins: [{type: queue-scorer}]\nsaturationDetector: {pluginRef: queue-scorer}", "saturationDetector"),
    ],
    ids=["unknown-type", "duplicate", "negative-weight", "string-weight", "unknown-ref", "two-pickers",
         "weight-on-picker", "unknown-field", "bad-parameter", "bad-detector"],
)
def test_profile_config_errors_are_clear(text, match):
    with pytest.raises(ConfigError, match=match):
        build_profile(parse_config(text, "cfg.yaml"), random.Random())


def test_full_config_builds_the_described_profile():
    profile = build_profile(parse_config("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {name: q, type: queue-scorer}
- {type: prefix-cache-scorer, parameters: {blockSizeTokens: 32, affinityMaxExtraLoad: 2}}
- {type: utilization-detector, parameters: {queueDepthThreshold: 10}}
- {type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: utilization-detector}
  - {pluginRef: q, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: max-score-picker}
saturationDetector: {pluginRef: utilization-detector}
"""), random.Random())
    assert [(s.name, w) for s, w in profile.scorers] == [("q", 2.0), ("prefix-cache-scorer", 3.0)]
    assert isinstance(profile.scorers[1][0], GuardedAffinityScorer)
    assert profile.prefix is not None and profile.prefix.block_tokens == 32
    assert profile.max_endpoints == 2 and profile.detector.queue_threshold == 10
    assert len(profile.filters) == 1
