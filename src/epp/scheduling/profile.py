"""Scheduling profiles from YAML (the reference EPP's ``EndpointPickerConfig`` shape).

```yaml
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: candidate-sampler, parameters: {maxCandidates: 16}}
- {type: queue-scorer}
- {name: prefix, type: prefix-cache-scorer, parameters: {blockSizeTokens: 16}}
- {type: max-score-picker, parameters: {maxNumOfEndpoints: 3}}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: candidate-sampler}
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: prefix, weight: 3}
  - {pluginRef: max-score-picker}
saturationDetector: {pluginRef: utilization-detector}
```

Unknown fields or plugin types, duplicate names, unknown references, negative or
non-numeric weights, a profile with no picker or two pickers: a ``ConfigError`` at
start, naming the culprit.  A type maps to a constructor in one dict (``_PLUGINS``;
:func:`plugin_types` lists them).

``candidate-sampler`` is epp's own: above ``maxCandidates`` endpoints a decision scores a
power-of-d sample (affinity holders first, the rest random) instead of the whole pool.
A profile without it scores every endpoint.  Saturation is always judged on the whole
pool.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from epp.errors import ConfigError
from epp.scheduling.base import Filter, Picker, Scorer
from epp.scheduling.blockkeys import TOKENIZERS, BlockKeys
from epp.scheduling.filters import FreshMetricsFilter
from epp.scheduling.pickers import MaxScorePicker, RandomPicker, RoundRobinPicker, WeightedRandomPicker
from epp.scheduling.saturation import UtilizationDetector
from epp.scheduling.scorers import (
    EstimatedQueueScorer,
    GuardedAffinityScorer,
    InflightLoadScorer,
    KvCacheScorer,
    LoraAffinityScorer,
    PrecisePrefixCacheScorer,
    PrefixCacheScorer,
    QueueScorer,
    RunningRequestsScorer,
)
from epp.scheduling.tokenizers import ServerTokenizer


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PluginSpec(_Strict):
    name: str | None = None
    type: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class PluginRef(_Strict):
    plugin_ref: str = Field(alias="pluginRef")
    weight: float | None = Field(None, ge=0, allow_inf_nan=False)


class ProfileSpec(_Strict):
    name: str
    plugins: list[PluginRef]


class DetectorRef(_Strict):
    plugin_ref: str = Field(alias="pluginRef")


class EndpointPickerConfig(_Strict):
    api_version: str = Field("inference.networking.x-k8s.io/v1alpha1", alias="apiVersion")
    kind: str = "EndpointPickerConfig"
    feature_gates: list[str] = Field(default_factory=list, alias="featureGates")
    plugins: list[PluginSpec]
    scheduling_profiles: list[ProfileSpec] = Field(default_factory=list, alias="schedulingProfiles")
    saturation_detector: DetectorRef | None = Field(None, alias="saturationDetector")


@dataclass
class PrefixSettings:
    block_tokens: int = 16
    max_blocks: int = 256
    capacity: int = 31_250
    auto_tune: bool = True


@dataclass
class SchedulerProfile:
    """filters → weighted scorers → one picker."""

    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[tuple[Scorer, float]] = field(default_factory=list)
    picker: Picker = field(default_factory=MaxScorePicker)
    detector: UtilizationDetector = field(default_factory=UtilizationDetector)
    prefix: PrefixSettings | None = None  # set when a prefix-cache scorer is used
    max_endpoints: int | None = None  # the picker's maxNumOfEndpoints, when given
    max_candidates: int | None = None  # candidate-sampler's budget; None scores every endpoint


@dataclass(frozen=True)
class CandidateSampler:
    """Marks a profile as sampled: at most ``max_candidates`` endpoints per decision."""

    max_candidates: int = 16
    name: str = "candidate-sampler"
    type: str = "candidate-sampler"


def _num(params: dict[str, Any], key: str, default: float, *, minimum: float = 0.0) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ValueError(f"parameter {key} must be a number >= {minimum}, got {value!r}")
    return float(value)


def _guarded(
    inner: PrefixCacheScorer | LoraAffinityScorer | PrecisePrefixCacheScorer, params: dict[str, Any]
) -> Scorer:
    cap = _num(params, "affinityMaxExtraLoad", 0.0)
    return GuardedAffinityScorer(inner, max_extra_load=cap) if cap > 0 else inner


def _server_tokenizer(params: dict[str, Any]) -> ServerTokenizer:
    """``tokenizer: vllm-tokenize``: ``tokenizeURL`` (a server's base URL; default "": a model
    server of the pool), ``tokenizeTimeout`` (seconds the decision waits; 0.05, at most 5),
    ``tokenizeCacheSize`` (prompts whose ids are kept; 1024)."""
    url = params.get("tokenizeURL", "")
    if not isinstance(url, str) or (url and not url.startswith("http://")):
        raise ValueError(f"parameter tokenizeURL must be an http:// URL, got {url!r}")
    timeout = _num(params, "tokenizeTimeout", 0.05)
    if not 0 < timeout <= 5.0:
        raise ValueError(f"parameter tokenizeTimeout must be above 0 and at most 5 seconds, got {timeout!r}")
    size = int(_num(params, "tokenizeCacheSize", 1024, minimum=1))
    return ServerTokenizer(url=url, timeout=timeout, cache_size=size)


def _precise(name: str, params: dict[str, Any]) -> PrecisePrefixCacheScorer:
    """``precise-prefix-cache-scorer``: ``tokenizer`` (``utf8-quad``; for ``vllm-tokenize`` see
    ``_server_tokenizer``), ``maxPrefixBlocksToMatch`` (256), ``speculativeTTL`` (seconds a pick
    counts as cached before the pod reports it; 2, 0 = off, at most 60), ``loraGate`` (true: an
    adapter's blocks count by the pod's LoRA state), and the approximate fallback's
    ``prefix-cache-scorer`` parameters; the KV-event index is bound by
    ``build_scheduler(kv_index=...)``.  (No hash seed: keys are epp's own, computed from token
    ids on both sides, so vLLM's ``PYTHONHASHSEED`` does not matter to them.)"""
    tokenizer = params.get("tokenizer", "utf8-quad")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"parameter tokenizer must be one of {', '.join(sorted(TOKENIZERS))}, got {tokenizer!r}")
    chosen = _server_tokenizer(params) if tokenizer == "vllm-tokenize" else TOKENIZERS[tokenizer]()
    keys = BlockKeys(chosen, max_blocks=int(_num(params, "maxPrefixBlocksToMatch", 256, minimum=1)))
    ttl = _num(params, "speculativeTTL", 2.0)
    if not ttl <= 60.0:  # also nan and inf: an entry must expire (and peers refuse longer ones)
        raise ValueError(f"parameter speculativeTTL must be at most 60 seconds, got {params['speculativeTTL']!r}")
    gate = params.get("loraGate", True)
    if not isinstance(gate, bool):
        raise ValueError(f"parameter loraGate must be true or false, got {gate!r}")
    return PrecisePrefixCacheScorer(keys=keys, speculative_ttl=ttl, lora_gate=gate, name=name)


# type → (kind, constructor(name, parameters, rng))
Constructor = Callable[[str, dict[str, Any], random.Random], Any]
_PLUGINS: dict[str, tuple[str, Constructor]] = {
    "candidate-sampler": (
        "sampler",
        lambda n, p, r: CandidateSampler(max_candidates=int(_num(p, "maxCandidates", 16, minimum=1)), name=n),
    ),
    "fresh-metrics-filter": ("filter", lambda n, p, r: FreshMetricsFilter(name=n)),
    "queue-scorer": ("scorer", lambda n, p, r: QueueScorer(name=n)),
    "running-requests-size-scorer": ("scorer", lambda n, p, r: RunningRequestsScorer(name=n)),
    "kv-cache-utilization-scorer": ("scorer", lambda n, p, r: KvCacheScorer(name=n)),
    "lora-affinity-scorer": ("scorer", lambda n, p, r: _guarded(LoraAffinityScorer(name=n), p)),
    "prefix-cache-scorer": ("scorer", lambda n, p, r: _guarded(PrefixCacheScorer(name=n), p)),
    "inflight-load-scorer": (
        "scorer",
        lambda n, p, r: InflightLoadScorer(
            name=n,
            tokens_per_request=_num(p, "tokensPerRequest", 2048.0, minimum=1.0),
            load_scale=_num(p, "loadScale", 8.0, minimum=1e-9),
        ),
    ),
    "estimated-queue-scorer": (
        "scorer",
        lambda n, p, r: EstimatedQueueScorer(
            name=n,
            tokens_per_request=_num(p, "tokensPerRequest", 2048.0, minimum=1.0),
            queue_scale=_num(p, "queueScale", 4.0, minimum=1e-9),
        ),
    ),
    "max-score-picker": ("picker", lambda n, p, r: MaxScorePicker(name=n, rng=r)),
    "random-picker": ("picker", lambda n, p, r: RandomPicker(name=n, rng=r)),
    "weighted-random-picker": ("picker", lambda n, p, r: WeightedRandomPicker(name=n, rng=r)),
    "round-robin-picker": ("picker", lambda n, p, r: RoundRobinPicker(name=n)),
    "utilization-detector": (
        "filter",
        lambda n, p, r: UtilizationDetector(
            name=n,
            queue_threshold=_num(p, "queueDepthThreshold", 5.0, minimum=1e-9),
            kv_threshold=_num(p, "kvCacheUtilThreshold", 0.8, minimum=1e-9),
            headroom=_num(p, "headroom", 0.0),
        ),
    ),
    "precise-prefix-cache-scorer": ("scorer", lambda n, p, r: _guarded(_precise(n, p), p)),
}


def parse_config(text: str, source: str = "config") -> EndpointPickerConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return EndpointPickerConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{source}: {loc}: {err['msg']}") from None


def build_profile(config: EndpointPickerConfig, rng: random.Random, source: str = "config") -> SchedulerProfile:
    """Instantiate the (single) scheduling profile of a config."""
    instances: dict[str, tuple[str, Any, PluginSpec]] = {}
    for plugin_spec in config.plugins:
        name = plugin_spec.name or plugin_spec.type
        if name in instances:
            raise ConfigError(f"{source}: duplicate plugin name {name!r}")
        if plugin_spec.type not in _PLUGINS:
            known = ", ".join(sorted(_PLUGINS))
            raise ConfigError(f"{source}: unknown plugin type {plugin_spec.type!r} (known: {known})")
        kind, make = _PLUGINS[plugin_spec.type]
        try:
            instances[name] = (kind, make(name, plugin_spec.parameters, rng), plugin_spec)
        except ValueError as exc:
            raise ConfigError(f"{source}: plugin {name!r}: {exc}") from None
    profiles = config.scheduling_profiles or [
        ProfileSpec(name="default", plugins=[PluginRef(pluginRef=n, weight=None) for n in instances])
    ]
    if len(profiles) != 1:
        raise ConfigError(f"{source}: exactly one scheduling profile is supported, got {len(profiles)}")
    spec = profiles[0]
    profile = SchedulerProfile(name=spec.name)
    pickers = []
    for ref in spec.plugins:
        if ref.plugin_ref not in instances:
            raise ConfigError(f"{source}: profile {spec.name!r} references unknown plugin {ref.plugin_ref!r}")
        kind, plugin, pspec = instances[ref.plugin_ref]
        if kind == "scorer":
            profile.scorers.append((plugin, 1.0 if ref.weight is None else ref.weight))
            # the precise scorer falls back on the approximate index, which needs the same settings
            if pspec.type in ("prefix-cache-scorer", "precise-prefix-cache-scorer"):
                p = pspec.parameters
                profile.prefix = PrefixSettings(
                    block_tokens=int(_num(p, "blockSizeTokens", 16, minimum=1)),
                    max_blocks=int(_num(p, "maxPrefixBlocksToMatch", 256, minimum=1)),
                    capacity=int(_num(p, "lruCapacityPerServer", 31_250, minimum=1)),
                    auto_tune=bool(p.get("autoTune", True)),
                )
        elif ref.weight is not None:
            raise ConfigError(f"{source}: weight given for {ref.plugin_ref!r}, which is not a scorer")
        elif kind == "picker":
            pickers.append(plugin)
            if "maxNumOfEndpoints" in pspec.parameters:
                profile.max_endpoints = int(_num(pspec.parameters, "maxNumOfEndpoints", 1, minimum=1))
        elif kind == "sampler":
            profile.max_candidates = plugin.max_candidates
        else:
            profile.filters.append(plugin)
    if len(pickers) > 1:
        raise ConfigError(f"{source}: profile {spec.name!r} has {len(pickers)} pickers; one is allowed")
    if pickers:
        profile.picker = pickers[0]
    else:
        profile.picker = MaxScorePicker(rng=rng)
    if config.saturation_detector is not None:
        ref_name = config.saturation_detector.plugin_ref
        found = instances.get(ref_name)
        if found is None or not isinstance(found[1], UtilizationDetector):
            raise ConfigError(f"{source}: saturationDetector {ref_name!r} is not a utilization-detector plugin")
        profile.detector = found[1]
    return profile


def load_config_file(path: str) -> EndpointPickerConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse_config(text, path)


# Built-in profiles, by name.  epp-default's weights won the routing-quality benchmark
# (benchmarks/README.md): the estimated queue (scraped waiting + what epp sent since the
# scrape) keeps bursts from herding; prefix affinity, weighted highest because a 2-6k
# token prefix hit saves most of a request's prefill, is cut back once an endpoint's
# queue is 4 requests above the shortest, so affinity never hot-spots; LoRA affinity
# keeps adapters from thrashing slots; KV use breaks the remaining ties.
_BUILTIN: dict[str, str] = {
    "gie-default": """
plugins:
- {type: queue-scorer}
- {type: kv-cache-utilization-scorer}
- {type: prefix-cache-scorer}
- {type: max-score-picker}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: max-score-picker}
""",
    "epp-default": """
plugins:
- {type: candidate-sampler, parameters: {maxCandidates: 16}}
- {type: estimated-queue-scorer, parameters: {queueScale: 4}}
- {type: kv-cache-utilization-scorer}
- {type: prefix-cache-scorer, parameters: {affinityMaxExtraLoad: 4}}
- {type: lora-affinity-scorer, parameters: {affinityMaxExtraLoad: 4}}
- {type: max-score-picker}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: candidate-sampler}
  - {pluginRef: estimated-queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 1}
  - {pluginRef: prefix-cache-scorer, weight: 5}
  - {pluginRef: lora-affinity-scorer, weight: 1}
  - {pluginRef: max-score-picker}
""",
    "least-inflight": """
plugins:
- {type: inflight-load-scorer, parameters: {tokensPerRequest: 1000000000000, loadScale: 0.000001}}
- {type: max-score-picker}
""",
    "random": """
plugins:
- {type: random-picker}
""",
    "round-robin": """
plugins:
- {type: round-robin-picker}
""",
    # The shadow pool's pick (load-aware mirroring): endpoints with fresh metrics first,
    # then the shortest estimated queue (scraped waiting + copies sent since), then the
    # fewest running; ties at random.  One queued request (weight 2) always outweighs
    # the whole running-requests range (weight 1).
    "least-loaded": """
plugins:
- {type: fresh-metrics-filter}
- {type: estimated-queue-scorer, parameters: {queueScale: 1}}
- {type: running-requests-size-scorer}
- {type: max-score-picker}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: fresh-metrics-filter}
  - {pluginRef: estimated-queue-scorer, weight: 2}
  - {pluginRef: running-requests-size-scorer, weight: 1}
  - {pluginRef: max-score-picker}
""",
}
# epp-default with the precise prefix scorer (KV events) in place of the approximate one;
# pods that publish no events still get the approximate match.  Needs the KV-event
# subscriber (``build_scheduler(kv_index=...)``); without it, it routes as epp-default.
_BUILTIN["epp-precise"] = _BUILTIN["epp-default"].replace("prefix-cache-scorer", "precise-prefix-cache-scorer")
# epp-precise keyed on the model server's own token ids (its /tokenize, asked before a decision):
# what a real vLLM needs; epp-precise's default tokenizer reproduces epp-sim's only
_BUILTIN["epp-precise-vllm"] = _BUILTIN["epp-precise"].replace(
    "{type: precise-prefix-cache-scorer, parameters: {affinityMaxExtraLoad: 4}}",
    "{type: precise-prefix-cache-scorer, parameters: {affinityMaxExtraLoad: 4, tokenizer: vllm-tokenize}}",
)
assert _BUILTIN["epp-precise-vllm"] != _BUILTIN["epp-precise"]

BUILTIN_PROFILES: tuple[str, ...] = tuple(sorted(_BUILTIN))


def plugin_types() -> tuple[str, ...]:
    """Every plugin type a config may name."""
    return tuple(sorted(_PLUGINS))


def builtin_config(name: str) -> EndpointPickerConfig:
    if name not in _BUILTIN:
        raise ConfigError(f"unknown scheduling profile {name!r} (built in: {', '.join(BUILTIN_PROFILES)})")
    return parse_config(_BUILTIN[name], f"built-in profile {name}")
