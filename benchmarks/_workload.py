"""The routing benchmark's fleet, workload and capacity calibration (shared by the benchmarks).

Owns what "the reference scenario under load" means in numbers:

- **Fleet**: `PODS` pods of the `h100-8b` profile with `max_loras=4` (epp-sim's defaults for
  KV blocks, batch limits and `max_model_len`).
- **Workload** (`Workload`): requests belong to *groups* (applications), each with its own
  system prompt of `prefix_tokens` tokens; group popularity is Zipf-distributed, so a few
  system prompts carry much of the traffic (the case where cache affinity can hot-spot).
  Each group is tied to one of the ten reference adapters; a request names that adapter with
  probability `adapter_share` and the base model otherwise, so half the traffic is LoRA
  and a group's prompt is cached under two keys (epp-sim keys its cache by adapter, as vLLM
  does). The user turn after the system prompt is unique per request; the output length is
  uniform in `output_tokens` (epp-sim generates exactly `max_tokens`).
- **Arrivals**: Poisson. `make_trace(workload, rate, duration)` draws the request contents
  and unit-rate gaps from the seed alone and divides the gaps by `rate`, so every load
  level replays the *same* requests in the same order, only compressed in time (a higher
  load has more of them in the same duration).
- **Capacity** (`calibrate_capacity`): the completion rate (requests/s) the fleet sustains
  with a standing backlog of this workload, measured in the simulator: `n` requests arrive
  at once, epp-sim's own `least_queue` router spreads them on live (not scraped) state,
  and the rate is the number of completions between the 20th and 80th percentile of
  finish times divided by the time between them (the fleet is saturated throughout that
  window; the ramp-up and the drain are left out). A load of 0.9 means Poisson arrivals
  at 0.9 x that rate.

Invariant: everything here is a pure function of its arguments (seeded `random.Random`),
so every process and every run builds the same trace.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from epp_sim import DEFAULT_LORA_MODULES, EngineConfig, TraceRequest, VirtualFleet, get_profile, least_queue

__all__ = [
    "ADAPTERS",
    "BASE_MODEL",
    "PODS",
    "Workload",
    "calibrate_capacity",
    "fleet_configs",
    "make_trace",
]

PODS = 8
BASE_MODEL = "/model/llama2"
ADAPTERS: tuple[str, ...] = tuple(m.name for m in DEFAULT_LORA_MODULES)
_CHARS_PER_TOKEN = 4  # epp-sim's tokenizer: one token per 4 bytes of ASCII text


@dataclass(frozen=True, slots=True)
class Workload:
    """Shape of the request mix (all ranges inclusive, in tokens)."""

    groups: int = 32
    zipf: float = 1.0
    prefix_tokens: tuple[int, int] = (2000, 6000)
    user_tokens: tuple[int, int] = (64, 512)
    output_tokens: tuple[int, int] = (200, 1000)
    adapter_share: float = 0.5
    seed: int = 0


def fleet_configs(pods: int = PODS) -> list[EngineConfig]:
    """The benchmark fleet: h100-8b pods with four LoRA slots each."""
    return [EngineConfig(profile=get_profile("h100-8b"), max_loras=4)] * pods


def _text(rng: random.Random, tokens: int, label: str) -> str:
    """ASCII text of exactly `tokens` epp-sim tokens, starting with `label`."""
    chars = tokens * _CHARS_PER_TOKEN
    filler = rng.randbytes(chars // 2 + 1).hex()
    return (label + filler)[:chars]


def _requests(workload: Workload) -> Iterator[TraceRequest]:
    """The workload's endless request sequence, with arrivals at rate 1 (request/s)."""
    rng = random.Random(workload.seed)
    prefixes = [
        _text(rng, rng.randint(*workload.prefix_tokens), f"[system prompt of application {g}] ")
        for g in range(workload.groups)
    ]
    group_adapter = [ADAPTERS[g % len(ADAPTERS)] for g in range(workload.groups)]
    weights = [1.0 / (g + 1) ** workload.zipf for g in range(workload.groups)]
    t = 0.0
    for k in itertools.count():
        t += rng.expovariate(1.0)
        g = rng.choices(range(workload.groups), weights)[0]
        adapter = group_adapter[g] if rng.random() < workload.adapter_share else None
        user = _text(rng, rng.randint(*workload.user_tokens), f"\n[user {k}] ")
        yield TraceRequest(
            arrival=t,
            prompt=prefixes[g] + user,
            max_tokens=rng.randint(*workload.output_tokens),
            adapter=adapter,
            request_id=f"r{k}",
        )


def make_trace(workload: Workload, rate: float, duration: float) -> list[TraceRequest]:
    """Poisson arrivals at `rate` requests/s for `duration` seconds.

    Any rate replays the same request sequence, compressed in time: a higher rate only
    adds requests at the end.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    trace = []
    for r in _requests(workload):
        arrival = r.arrival / rate
        if arrival > duration:
            return trace
        trace.append(dataclasses.replace(r, arrival=arrival))
    raise AssertionError("unreachable")


def _window_rate(finishes: Sequence[float], lo: float = 0.2, hi: float = 0.8) -> float:
    """Completions per second between the finishes at ranks int(lo * n) and int(hi * n) - 1.

    Deliberately two order statistics, not `_stats.percentile`: the numerator is the exact
    number of completions between the two finishes, so both ends must be real finishes.
    """
    ordered = sorted(finishes)
    a, b = int(lo * len(ordered)), int(hi * len(ordered)) - 1
    return (b - a) / (ordered[b] - ordered[a])


def calibrate_capacity(workload: Workload, n: int = 2400, pods: int = PODS) -> float:
    """Saturation throughput of the fleet on `workload`, in requests/s (see module docstring)."""
    trace = [dataclasses.replace(r, arrival=0.0) for r in itertools.islice(_requests(workload), n)]
    results = VirtualFleet(fleet_configs(pods), router=least_queue).run(trace)
    return _window_rate([r.finish for r in results])
