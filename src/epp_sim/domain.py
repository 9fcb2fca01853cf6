"""Value types shared by the engine, its drivers and the HTTP layer.

Owns `EngineConfig` (validated once), `SimRequest` (the one mutable per-request record the
engine updates in place), the read-only `EngineState` snapshot a scrape sees, and cumulative
`EngineCounters`.

Invariant: only `engine.Engine` mutates a `SimRequest`'s scheduling fields; drivers read them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from epp_sim.kvcache import BlockTable
from epp_sim.profiles import H100_8B, Profile
from epp_sim.tokenizer import Prompt

__all__ = ["EngineConfig", "EngineCounters", "EngineState", "RequestTooLarge", "SimRequest", "Status"]


class RequestTooLarge(ValueError):
    """The request can never be served by this engine (context length or KV size)."""


class Status(enum.Enum):
    NEW = "new"
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Static configuration of one pod's engine (vLLM flag names)."""

    profile: Profile = H100_8B
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_gpu_blocks: int = 27793
    block_size: int = 16
    max_loras: int = 4
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.num_gpu_blocks < 2:
            raise ValueError("num_gpu_blocks must be at least 2")
        if self.max_loras < 0:
            raise ValueError("max_loras must not be negative")


@dataclass(eq=False, slots=True)
class SimRequest:
    """One generation request as the engine sees it, with its progress.

    `arrival` is when the engine may first schedule it; `received` (optional, earlier) is
    when the HTTP frontend got it, so that latency metrics include parsing, as in vLLM.
    """

    request_id: str
    prompt: Prompt
    max_tokens: int
    arrival: float
    adapter: str | None = None
    stop_reason: str = "length"
    text_seed: int = 0
    received: float | None = None
    status: Status = Status.NEW
    num_computed: int = 0
    num_output: int = 0
    blocks: BlockTable = field(default_factory=BlockTable)
    preemptions: int = 0
    cached_tokens: int = 0
    first_scheduled: float | None = None
    first_token_time: float | None = None
    last_token_time: float = 0.0
    finish_time: float | None = None
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")

    @property
    def received_at(self) -> float:
        """When the frontend received the request (latency metrics count from here)."""
        return self.arrival if self.received is None else self.received

    @property
    def total_tokens(self) -> int:
        """Tokens whose KV must be computed before the next output token."""
        return self.prompt.num_tokens + self.num_output

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(frozen=True, slots=True)
class EngineState:
    """What a metrics scrape of the engine sees."""

    waiting: int
    running: int
    deferred: int
    kv_usage: float
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]


@dataclass(slots=True)
class EngineCounters:
    """Cumulative counts since the engine started."""

    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    lora_loads: int = 0
    finished: int = 0
