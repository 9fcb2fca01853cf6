"""The per-pod engine: a clock-agnostic model of vLLM's continuous batching.

Owns the waiting and running queues, step scheduling (token budget, `max_num_seqs`, KV
blocks, LoRA slots), preemption, and the timing of every generated token. It never reads a
clock: callers pass `now`, so one engine serves real HTTP (`realtime.EngineRunner`) and
virtual-time simulation (`fleet.VirtualFleet`) alike.

Driving it::

    engine.add_request(req)          # req.arrival is the arrival time
    t = engine.next_event_time()     # None when idle
    outputs = engine.advance(t)      # completes the step due at t and starts the next

A step is decided at its start (batch, blocks, duration) and takes effect at its end, when
each scheduled request whose prompt is fully computed emits one token. Steps run back to
back while there is work; an idle engine starts a step at the first waiting arrival.

Scheduling per step (after vLLM V1's FCFS scheduler):
1. Running requests, oldest first, get their next chunk (one token when decoding). If a block
   cannot be allocated, the newest running request is preempted (blocks freed, recomputed
   later from the front of the waiting queue) until it fits.
2. If nothing was preempted, waiting requests are admitted in order while the running count
   is below `max_num_seqs`, token budget remains and blocks suffice. Prefill is chunked and
   costs only the tokens not found in the prefix cache. A request whose adapter would exceed
   `max_loras` distinct adapters in the batch is skipped (deferred), not head-of-line blocking.

Invariants: a request is in exactly one of waiting, running or finished; only requests with
`arrival <= step start` are admitted; token times are strictly increasing per request.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from epp_sim.domain import EngineConfig, EngineCounters, EngineState, RequestTooLarge, SimRequest, Status
from epp_sim.kvcache import BlockTable, KVCache
from epp_sim.profiles import FAST, Profile

__all__ = ["Engine", "StepOutput"]


@dataclass(slots=True)
class StepOutput:
    """What one completed step produced, stamped with its end time."""

    start: float
    end: float
    num_tokens: int
    emitted: list[SimRequest] = field(default_factory=list)
    first_tokens: list[SimRequest] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    finished: list[SimRequest] = field(default_factory=list)


@dataclass(slots=True)
class _Batch:
    start: float
    end: float
    scheduled: list[tuple[SimRequest, int]]
    num_tokens: int


class Engine:
    """One pod's scheduler and timing model."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig(profile=FAST)
        self.profile: Profile = self.config.profile
        self.kv = KVCache(self.config.num_gpu_blocks, self.config.block_size)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.counters = EngineCounters()
        self.version = 0
        self._batch: _Batch | None = None
        self._last_end = -math.inf
        self._loras: OrderedDict[str, None] = OrderedDict()
        self._deferred = 0
        # Requests per adapter in each queue, kept incrementally so a scrape is O(adapters).
        self._waiting_adapters: dict[str, int] = {}
        self._running_adapters: dict[str, int] = {}

    # -- public driving API -------------------------------------------------------------
    def validate(self, req: SimRequest) -> None:
        """Raise `RequestTooLarge` if `req` can never be served by this engine."""
        if req.adapter and self.config.max_loras == 0:
            raise ValueError("LoRA is disabled (max_loras=0) but the request names an adapter")
        total = req.prompt.num_tokens + req.max_tokens
        if total > self.config.max_model_len:
            raise RequestTooLarge(
                f"This model's maximum context length is {self.config.max_model_len} tokens. "
                f"However, you requested {total} tokens ({req.prompt.num_tokens} in the messages, "
                f"{req.max_tokens} in the completion). Please reduce the length of the messages "
                "or completion."
            )
        if self.kv.blocks_for(total) > self.kv.usable:
            raise RequestTooLarge(
                f"Request needs {self.kv.blocks_for(total)} KV blocks but only {self.kv.usable} exist."
            )

    def add_request(self, req: SimRequest) -> None:
        """Queue `req` (arrived at `req.arrival`); raise `RequestTooLarge` if it can never fit."""
        self.validate(req)
        req.status = Status.WAITING
        self.waiting.append(req)
        _count(self._waiting_adapters, req.adapter, 1)
        self.version += 1

    def abort(self, req: SimRequest, now: float) -> None:
        """Drop `req` wherever it is; its blocks are freed at once."""
        if req.status is Status.WAITING:
            self.waiting.remove(req)
            _count(self._waiting_adapters, req.adapter, -1)
        elif req.status is Status.RUNNING:
            self.running.remove(req)
            _count(self._running_adapters, req.adapter, -1)
            self.kv.free(req.blocks)
        else:
            return
        req.status = Status.FINISHED
        req.finish_reason = "abort"
        req.finish_time = now
        self.version += 1

    def restart(self) -> None:
        """The pod's process restarted: an empty prefix cache and no adapter loaded.

        Every running request starts over from the front of the waiting queue (as if its
        client retried on the same address at once; counted as a preemption) and the step in
        flight completes nothing.  The cache is dropped without an event: a new process
        announces nothing, its events simply start again from sequence number 0.
        """
        for req in reversed(self.running):
            self._preempt(req)
        self.running = []
        self._loras.clear()
        self.kv.clear(publish=False)
        self.version += 1

    def next_event_time(self) -> float | None:
        """When `advance` next has something to do, or None if idle with nothing queued."""
        if self._batch is not None:
            return self._batch.end
        if self.running:
            return self._last_end
        if self.waiting:
            return max(self._last_end, min(r.arrival for r in self.waiting))
        return None

    def advance(self, now: float, max_lag: float = math.inf) -> list[StepOutput]:
        """Complete every step that ends by `now` and start the next one.

        `max_lag` bounds catch-up in real time: a step never starts earlier than
        `now - max_lag`, so a stalled event loop re-anchors instead of replaying the past.
        """
        outputs: list[StepOutput] = []
        while True:
            batch = self._batch
            if batch is not None:
                if batch.end > now:
                    return outputs
                outputs.append(self._complete(batch))
            start = self.next_event_time()
            if start is None or start > now:
                return outputs
            if start < now - max_lag:
                start = now
            if not self._start(start):
                return outputs

    def state(self) -> EngineState:
        """The gauges a scrape would see right now."""
        return EngineState(
            waiting=len(self.waiting),
            running=len(self.running),
            deferred=self._deferred,
            kv_usage=self.kv.usage,
            running_adapters=tuple(self._running_adapters),
            waiting_adapters=tuple(self._waiting_adapters),
        )

    @property
    def busy(self) -> bool:
        """True while a step is in flight."""
        return self._batch is not None

    # -- scheduling -----------------------------------------------------------------------
    def _start(self, start: float) -> bool:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[SimRequest, int]] = []
        adapters: set[str] = set()
        loads = 0
        preempted = False
        kv = self.kv
        block_size = kv.block_size
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.prompt.num_tokens + req.num_output - req.num_computed, budget)
            table = req.blocks
            # Fast path: most decode steps fit in the last block already held.
            if req.num_computed + n > (len(table.held) + table.private) * block_size:
                victim: SimRequest | None = None
                while victim is not req and not kv.grow(table, req.num_computed + n):
                    victim = self.running.pop()  # the newest running request
                    self._preempt(victim)
                    preempted = True
                if victim is req:
                    break
            scheduled.append((req, n))
            budget -= n
            if req.adapter and req.adapter not in adapters:
                adapters.add(req.adapter)
                loads += self._load_lora(req.adapter, adapters)
            i += 1
        self._deferred = 0
        if not preempted or not scheduled:
            loads += self._admit(start, budget, scheduled, adapters)
        if not scheduled:
            return False
        kv_read = 0
        attn = 0.0
        num_tokens = 0
        for req, n in scheduled:
            num_tokens += n
            kv_read += req.num_computed + n
            attn += n * (req.num_computed + n / 2)
        duration = self.profile.step_time(num_tokens, kv_read, attn, len(adapters), loads)
        self._batch = _Batch(start, start + duration, scheduled, num_tokens)
        self.counters.steps += 1
        self.version += 1
        return True

    def _admit(self, start: float, budget: int, scheduled: list[tuple[SimRequest, int]], adapters: set[str]) -> int:
        cfg = self.config
        kv = self.kv
        skipped: list[SimRequest] = []
        deferred = 0
        loads = 0
        while self.waiting and len(self.running) < cfg.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if req.arrival > start:  # arrived after this step began (real-time catch-up)
                skipped.append(self.waiting.popleft())
                continue
            if req.adapter and req.adapter not in adapters and len(adapters) >= cfg.max_loras:
                skipped.append(self.waiting.popleft())
                deferred += 1
                continue
            total = req.total_tokens
            hit_blocks = kv.match(req.prompt.block_hashes, (total - 1) // kv.block_size)
            hit_tokens = hit_blocks * kv.block_size
            n = min(total - hit_tokens, budget)
            if not kv.admit(req.blocks, req.prompt.block_hashes[:hit_blocks], hit_tokens + n):
                break
            self.waiting.popleft()
            self.running.append(req)
            if req.adapter:
                _count(self._waiting_adapters, req.adapter, -1)
                _count(self._running_adapters, req.adapter, 1)
            req.status = Status.RUNNING
            req.num_computed = hit_tokens
            if req.first_scheduled is None:
                req.first_scheduled = start
                req.cached_tokens = hit_tokens
            self.counters.prefix_queries += total
            self.counters.prefix_hits += hit_tokens
            scheduled.append((req, n))
            budget -= n
            if req.adapter and req.adapter not in adapters:
                adapters.add(req.adapter)
                loads += self._load_lora(req.adapter, adapters)
        self._deferred = deferred
        self.waiting.extendleft(reversed(skipped))
        return loads

    def _load_lora(self, adapter: str, in_batch: set[str]) -> int:
        slots = self._loras
        if adapter in slots:
            slots.move_to_end(adapter)
            return 0
        if len(slots) >= self.config.max_loras:
            victim = next((a for a in slots if a not in in_batch), None)
            if victim is not None:
                del slots[victim]
        slots[adapter] = None
        self.counters.lora_loads += 1
        return 1

    def _preempt(self, req: SimRequest) -> None:
        self.kv.free(req.blocks)
        req.blocks = BlockTable()
        req.num_computed = 0
        req.preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        _count(self._running_adapters, req.adapter, -1)
        _count(self._waiting_adapters, req.adapter, 1)
        self.counters.preemptions += 1

    # -- step completion --------------------------------------------------------------------
    def _complete(self, batch: _Batch) -> StepOutput:
        end = batch.end
        out = StepOutput(batch.start, end, batch.num_tokens)
        kv = self.kv
        for req, n in batch.scheduled:
            if req.status is not Status.RUNNING:
                continue  # aborted during the step
            req.num_computed += n
            if req.blocks.registered < len(req.prompt.block_hashes):
                kv.commit(req.blocks, req.prompt.block_hashes, req.num_computed, req.prompt, req.adapter)
            if req.num_computed < req.prompt.num_tokens + req.num_output:
                continue
            req.num_output += 1
            out.emitted.append(req)
            if req.first_token_time is None:
                req.first_token_time = end
                out.first_tokens.append(req)
                self.counters.prompt_tokens += req.prompt.num_tokens
            else:
                out.itls.append(end - req.last_token_time)
            req.last_token_time = end
            self.counters.generation_tokens += 1
            if req.num_output >= req.max_tokens:
                req.status = Status.FINISHED
                _count(self._running_adapters, req.adapter, -1)
                req.finish_reason = req.stop_reason
                req.finish_time = end
                kv.free(req.blocks)
                out.finished.append(req)
                self.counters.finished += 1
        if out.finished:
            self.running = [r for r in self.running if r.status is Status.RUNNING]
        self._batch = None
        self._last_end = end
        self.version += 1
        return out


def _count(counts: dict[str, int], adapter: str | None, delta: int) -> None:
    if not adapter:
        return
    n = counts.get(adapter, 0) + delta
    if n > 0:
        counts[adapter] = n
    else:
        del counts[adapter]
