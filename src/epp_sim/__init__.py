"""epp-sim: a vLLM fleet simulator for testing and benchmarking epp (imports nothing from epp).

Module map (each module's docstring states what it owns):

- `profiles`  step-time formula and the `h100-8b`, `a100-8b`, `fast` profiles
- `tokenizer` deterministic ~4-bytes-per-token tokenizer and chained block hashes
- `kvcache`   paged KV blocks with an LRU prefix cache
- `domain`    EngineConfig, SimRequest, EngineState, EngineCounters
- `engine`    the clock-agnostic continuous-batching engine (`step` = `advance(now)`)
- `fleet`     VirtualFleet: discrete-event replay of a trace over N engines with a router
- `realtime`  EngineRunner: drives an engine on the asyncio clock
- `metrics`   per-pod vLLM `/metrics` (0.33 and legacy names)
- `openai_api`, `handlers`, `server`  the OpenAI HTTP surface, SimPod and SimFleet
- `cli`       the `epp-sim` console script; `calibrate` prints the profile figures
"""

from epp_sim.domain import EngineConfig, EngineCounters, EngineState, RequestTooLarge, SimRequest
from epp_sim.engine import Engine, StepOutput
from epp_sim.fleet import PodSnapshot, RequestResult, Router, TraceRequest, VirtualFleet, least_queue, round_robin
from epp_sim.metrics import MetricsOverride, PodMetrics
from epp_sim.profiles import PROFILES, Profile, get_profile
from epp_sim.server import DEFAULT_LORA_MODULES, LoraModule, PodConfig, SimFleet, SimPod
from epp_sim.tokenizer import Prompt, tokenize

__all__ = [
    "DEFAULT_LORA_MODULES",
    "PROFILES",
    "Engine",
    "EngineConfig",
    "EngineCounters",
    "EngineState",
    "LoraModule",
    "MetricsOverride",
    "PodConfig",
    "PodMetrics",
    "PodSnapshot",
    "Profile",
    "Prompt",
    "RequestResult",
    "RequestTooLarge",
    "Router",
    "SimFleet",
    "SimPod",
    "SimRequest",
    "StepOutput",
    "TraceRequest",
    "VirtualFleet",
    "get_profile",
    "least_queue",
    "round_robin",
    "tokenize",
]
