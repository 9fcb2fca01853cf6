"""Unit tests of `epp-sim` flag parsing."""

from __future__ import annotations

import argparse

import pytest

from epp_sim.cli import build_parser, parse_lora_module, pod_config
from epp_sim.server import DEFAULT_LORA_MODULES, LoraModule


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sql-lora", LoraModule("sql-lora", "/adapters/sql-lora")),
        ("sql-lora=/a/b", LoraModule("sql-lora", "/a/b")),
        ('{"name": "x", "path": "/p", "base_model_name": "m"}', LoraModule("x", "/p")),
    ],
    ids=["bare", "name=path", "json"],
)
def test_parse_lora_module(text: str, expected: LoraModule) -> None:
    assert parse_lora_module(text) == expected


@pytest.mark.parametrize("text", ["=x", "{bad json", '{"path": "/p"}'], ids=["no-name", "bad-json", "json-no-name"])
def test_parse_lora_module_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_lora_module(text)


def test_defaults_are_the_reference_scenario() -> None:
    cfg = pod_config(build_parser().parse_args([]))
    assert cfg.model == "/model/llama2" and cfg.served_names == ("/model/llama2",)
    assert cfg.lora_modules == DEFAULT_LORA_MODULES
    assert [m.name for m in cfg.lora_modules][:2] == ["sql-lora", "sql-lora-1"]
    assert "tweet-summary-4" in {m.name for m in cfg.lora_modules}
    e = cfg.engine
    assert (e.profile.name, e.max_loras, e.max_num_seqs, e.max_num_batched_tokens) == ("h100-8b", 4, 256, 8192)
    assert (e.num_gpu_blocks, e.block_size, cfg.metrics_format) == (27793, 16, "vllm-0.33")


def test_flags_map_to_config() -> None:
    args = build_parser().parse_args(
        ["--served-model-name", "llama", "alias", "--lora-modules", "--profile", "a100-8b", "--max-loras", "2",
         "--num-gpu-blocks", "100", "--metrics-format", "vllm-legacy", "--seed", "7"]
    )  # fmt: skip
    cfg = pod_config(args)
    assert cfg.served_names == ("llama", "alias") and cfg.lora_modules == ()
    assert cfg.engine.profile.name == "a100-8b" and cfg.engine.max_loras == 2 and cfg.engine.num_gpu_blocks == 100
    assert cfg.metrics_format == "vllm-legacy" and cfg.seed == 7
