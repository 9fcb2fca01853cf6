"""Hardware timing profiles: how long one continuous-batching step takes.

Owns the step-time formula and the named profiles (`h100-8b`, `a100-8b`, `fast`). A step's
duration depends only on what is in the batch, never on the clock, so the same numbers drive
real-time serving and virtual-time simulation.

The formula (all terms in seconds)::

    linear    = base + decode_token_s * min(n, knee) + prefill_token_s * max(0, n - knee)
    attention = kv_read_s * sum(context after step) + prefill_attn_s * sum(n_i * (start_i + n_i / 2))
    lora      = lora_step_s * adapters_in_batch + lora_load_s * adapters_loaded_this_step
    step      = linear + attention + lora

`n` is the number of tokens computed in the step (prefill chunks plus one per decoding
request). Below the knee the linear layers are memory-bound (reading the weights dominates,
so extra tokens are nearly free); above it they are compute-bound at the prefill rate.

Invariant: `step_time` is monotone non-decreasing in every argument.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROFILES", "Profile", "get_profile"]


@dataclass(frozen=True, slots=True)
class Profile:
    """Coefficients of the step-time formula for one (model, GPU) pair."""

    name: str
    base_s: float
    decode_token_s: float
    knee_tokens: int
    prefill_token_s: float
    kv_read_s: float
    prefill_attn_s: float
    lora_step_s: float
    lora_load_s: float

    def step_time(
        self,
        num_tokens: int,
        kv_read_tokens: int,
        attn_pairs: float,
        num_adapters: int = 0,
        num_loads: int = 0,
    ) -> float:
        """Duration of one step that computes `num_tokens` new tokens."""
        below = min(num_tokens, self.knee_tokens)
        above = max(0, num_tokens - self.knee_tokens)
        linear = self.base_s + self.decode_token_s * below + self.prefill_token_s * above
        attention = self.kv_read_s * kv_read_tokens + self.prefill_attn_s * attn_pairs
        lora = self.lora_step_s * num_adapters + self.lora_load_s * num_loads
        return linear + attention + lora


# Fitted to the H100 80GB microbenchmark figures in reference/model-servers.md §7:
# decode 6.05 ms at batch 1 (ctx 1024), 9.27 ms at batch 64 (ctx 1024), 11.9 ms at batch 64
# (ctx 2048), 19.4 ms at batch 256; prefill 35-40k tokens/s for 512-8192-token prompts.
# The ctx-1024 vs ctx-2048 gap at batch 64 gives kv_read_s = 2.63 ms / 65536 tokens = 40 ns.
# LoRA costs are assumptions (no measured vLLM figure found); see README.md.
H100_8B = Profile(
    name="h100-8b",
    base_s=6.0e-3,
    decode_token_s=10.5e-6,
    knee_tokens=256,
    prefill_token_s=24.0e-6,
    kv_read_s=40e-9,
    prefill_attn_s=0.45e-9,
    lora_step_s=0.3e-3,
    lora_load_s=25e-3,
)

# A100: 13.3 ms decode at batch 1 (75 tok/s measured), ~15k tokens/s prefill (vidur linear ops);
# attention scaled by the HBM bandwidth ratio (~2x slower than H100).
A100_8B = Profile(
    name="a100-8b",
    base_s=13.2e-3,
    decode_token_s=20e-6,
    knee_tokens=128,
    prefill_token_s=62e-6,
    kv_read_s=80e-9,
    prefill_attn_s=1.0e-9,
    lora_step_s=0.5e-3,
    lora_load_s=40e-3,
)

# For tests: steps of about a millisecond, prefill still costing clearly more than decode so
# prefix-cache hits and queueing are visible within a few hundred milliseconds.
FAST = Profile(
    name="fast",
    base_s=1.0e-3,
    decode_token_s=5e-6,
    knee_tokens=64,
    prefill_token_s=10e-6,
    kv_read_s=5e-9,
    prefill_attn_s=0.0,
    lora_step_s=0.1e-3,
    lora_load_s=2e-3,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (H100_8B, A100_8B, FAST)}


def get_profile(name: str) -> Profile:
    """Return the named profile or raise `KeyError` listing the known names."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise KeyError(f"unknown profile {name!r} (known: {known})") from None
