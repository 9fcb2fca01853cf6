"""Measure a profile's headline figures by running the engine in virtual time.

Owns the calibration scenarios quoted in `README.md`: decode step time by batch size and
context, prefill throughput by prompt length, idle TTFT, the prefix-cache effect and the LoRA
load cost. Every number comes from the engine itself (not from the formula), so scheduling
effects such as chunked prefill are included.

    python -m epp_sim.calibrate [--profile h100-8b] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import orjson

from epp_sim.domain import EngineConfig, SimRequest
from epp_sim.engine import Engine, StepOutput
from epp_sim.profiles import PROFILES, get_profile
from epp_sim.tokenizer import BYTES_PER_TOKEN, tokenize

__all__ = ["decode_step_ms", "main", "measure", "prefill_tokens_per_s", "ttft_ms"]

# Room for everything at once, so that each scenario measures one effect.
_ROOMY = EngineConfig(max_num_seqs=1024, max_num_batched_tokens=1 << 20, max_model_len=1 << 20)


def _text(tokens: int, tag: str) -> str:
    return (f"{tag}|" + "lorem ipsum dolor sit amet " * (tokens // 6 + 2))[: tokens * BYTES_PER_TOKEN]


def _run(engine: Engine, reqs: Sequence[SimRequest]) -> list[StepOutput]:
    for r in reqs:
        engine.add_request(r)
    outs: list[StepOutput] = []
    t = engine.next_event_time()
    while t is not None:
        outs += engine.advance(t)
        t = engine.next_event_time()
    return outs


def decode_step_ms(config: EngineConfig, batch: int, context: int) -> float:
    """Mean duration of pure decode steps of `batch` requests at about `context` tokens."""
    engine = Engine(config)
    block = config.block_size
    reqs = [SimRequest(str(i), tokenize(_text(context - 4, str(i)), block), 8, 0.0) for i in range(batch)]
    steps = [o.end - o.start for o in _run(engine, reqs) if o.num_tokens == batch and not o.first_tokens]
    return 1e3 * sum(steps) / len(steps)


def prefill_tokens_per_s(config: EngineConfig, tokens: int) -> float:
    """Prompt tokens per second of one cold prompt of `tokens` tokens on an idle engine."""
    req = SimRequest("p", tokenize(_text(tokens, "p"), config.block_size), 1, 0.0)
    _run(Engine(config), [req])
    assert req.first_token_time is not None
    return tokens / req.first_token_time


def ttft_ms(config: EngineConfig, tokens: int, adapter: str | None = None, repeat: bool = False) -> float:
    """Idle-engine TTFT of one prompt; with `repeat`, of the same prompt sent a second time."""
    engine = Engine(config)
    text = _text(tokens, "t")
    first = SimRequest("a", tokenize(text, config.block_size, adapter), 1, 0.0, adapter)
    _run(engine, [first])
    if not repeat:
        assert first.first_token_time is not None
        return 1e3 * first.first_token_time
    second = SimRequest("b", tokenize(text, config.block_size, adapter), 1, 100.0, adapter)
    _run(engine, [second])
    assert second.first_token_time is not None
    return 1e3 * (second.first_token_time - 100.0)


def measure(profile_name: str) -> dict[str, float]:
    """Every calibration figure of one profile, keyed by a short name."""
    roomy = dataclasses.replace(_ROOMY, profile=get_profile(profile_name))
    default = EngineConfig(profile=get_profile(profile_name))
    out: dict[str, float] = {}
    for batch, ctx in ((1, 1024), (8, 1024), (64, 1024), (64, 2048), (256, 1024)):
        out[f"decode_ms_b{batch}_ctx{ctx}"] = decode_step_ms(roomy, batch, ctx)
    for tokens in (512, 2048, 8192):
        out[f"prefill_tok_per_s_{tokens}"] = prefill_tokens_per_s(roomy, tokens)
    out["ttft_ms_256"] = ttft_ms(default, 256)
    out["ttft_ms_4000_cold"] = ttft_ms(default, 4000)
    out["ttft_ms_4000_warm"] = ttft_ms(default, 4000, repeat=True)
    out["ttft_ms_256_lora_cold"] = ttft_ms(default, 256, adapter="sql-lora")
    out["ttft_ms_16k_chunked"] = ttft_ms(dataclasses.replace(default, max_model_len=32768), 16000)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the figures as a table (or one JSON line per profile with `--json`)."""
    p = argparse.ArgumentParser(prog="python -m epp_sim.calibrate")
    p.add_argument("--profile", choices=sorted(PROFILES), action="append")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for name in args.profile or ["h100-8b", "a100-8b"]:
        figures = measure(name)
        if args.json:
            sys.stdout.write(orjson.dumps({"profile": name, **figures}).decode() + "\n")
            continue
        sys.stdout.write(f"{name}\n")
        for key, value in figures.items():
            sys.stdout.write(f"  {key:28s} {value:12.2f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
