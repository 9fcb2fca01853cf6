"""`epp-sim`: command-line entry point that serves N simulated vLLM pods.

Owns argument parsing (vLLM flag names), turning flags into one `PodConfig`, and the process
lifecycle: start the pods on uvloop, print one machine-readable line per pod, run until
SIGTERM or SIGINT, then close every pod and exit 0.

Output contract (stdout, flushed, one line per pod, in pod order)::

    epp-sim pod pod-0 listening on 127.0.0.1:8001

With `--kv-events-endpoint`, each pod's line is followed by one more::

    epp-sim pod pod-0 kv-events on tcp://127.0.0.1:5557 topic kv@127.0.0.1:8001@/model/llama2

Pod `i` binds the endpoint's port + `i` (vLLM offsets its data-parallel ranks the same way);
port 0 lets the OS choose for each pod.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import orjson
import uvloop

from epp_sim.domain import EngineConfig
from epp_sim.kvevents import FORMATS
from epp_sim.metrics import METRICS_FORMATS
from epp_sim.profiles import PROFILES, get_profile
from epp_sim.server import DEFAULT_LORA_MODULES, LoraModule, PodConfig, SimFleet

__all__ = ["build_parser", "main", "parse_lora_module", "pod_config", "serve"]

logger = logging.getLogger(__name__)


def parse_lora_module(text: str) -> LoraModule:
    """Parse `name=path`, vLLM's JSON form `{"name": ..., "path": ...}`, or a bare name."""
    if text.startswith("{"):
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid LoRA module JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise argparse.ArgumentTypeError("LoRA module JSON needs a string 'name'")
        return LoraModule(obj["name"], str(obj.get("path") or f"/adapters/{obj['name']}"))
    name, sep, path = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"invalid LoRA module {text!r}")
    return LoraModule(name, path if sep and path else f"/adapters/{name}")


def build_parser() -> argparse.ArgumentParser:
    """The `epp-sim` argument parser."""
    p = argparse.ArgumentParser(prog="epp-sim", description="Simulated vLLM pods for testing epp.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port of the first pod; 0 = OS-chosen for each")
    p.add_argument("--pods", type=int, default=1, help="number of pods, on consecutive ports")
    p.add_argument("--pod-name-prefix", default="pod", help="pods are named <prefix>-<i>")
    p.add_argument("--model", default="/model/llama2", help="base model name (default /model/llama2)")
    p.add_argument("--served-model-name", nargs="+", default=None, help="names the base model answers to")
    p.add_argument(
        "--lora-modules",
        nargs="*",
        type=parse_lora_module,
        default=None,
        help="adapters as name, name=path or JSON; default: the reference scenario's sql-lora*/tweet-summary*",
    )
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--num-gpu-blocks", type=int, default=27793)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--profile", choices=sorted(PROFILES), default="h100-8b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics-format", choices=METRICS_FORMATS, default="vllm-0.33")
    p.add_argument(
        "--kv-events-endpoint",
        default=None,
        help="publish vLLM KV-cache events on this ZMQ endpoint (bound), e.g. tcp://127.0.0.1:5557; default: off",
    )
    p.add_argument(
        "--kv-events-topic",
        default="kv@{address}@{model}",
        help="topic template: {address} (host:port), {name}, {model} (default kv@{address}@{model})",
    )
    p.add_argument(
        "--kv-events-format",
        choices=FORMATS,
        default="map",
        help="map: events as tagged maps (vLLM since PR #42892); array: the older positional form",
    )
    p.add_argument("--log-level", default="WARNING")
    return p


def pod_config(args: argparse.Namespace) -> PodConfig:
    """The `PodConfig` the parsed flags describe (raises `ValueError` on bad values)."""
    engine = EngineConfig(
        profile=get_profile(args.profile),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_gpu_blocks=args.num_gpu_blocks,
        block_size=args.block_size,
        max_loras=args.max_loras,
        max_model_len=args.max_model_len,
    )
    loras = DEFAULT_LORA_MODULES if args.lora_modules is None else tuple(args.lora_modules)
    return PodConfig(
        model=args.model,
        served_model_names=tuple(args.served_model_name or ()),
        lora_modules=loras,
        engine=engine,
        metrics_format=args.metrics_format,
        seed=args.seed,
        kv_events_endpoint=args.kv_events_endpoint,
        kv_events_topic=args.kv_events_topic,
        kv_events_form=args.kv_events_format,
    )


async def serve(config: PodConfig, pods: int, host: str, port: int, name_prefix: str = "pod") -> None:
    """Run `pods` pods until SIGTERM/SIGINT, announcing each bound port on stdout."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fleet = SimFleet(config, pods, host=host, port=port, name_prefix=name_prefix)
    await fleet.start()
    logger.info("serving %d pod(s) with profile %s", pods, config.engine.profile.name)
    try:
        for pod in fleet.pods:
            sys.stdout.write(f"epp-sim pod {pod.name} listening on {pod.host}:{pod.port}\n")
            if pod.kv_events is not None:
                kv = pod.kv_events
                sys.stdout.write(f"epp-sim pod {pod.name} kv-events on {kv.endpoint} topic {kv.topic}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await fleet.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pods < 1:
        parser.error("--pods must be at least 1")
    try:
        config = pod_config(args)
    except (ValueError, KeyError) as e:
        parser.error(str(e))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        uvloop.run(serve(config, args.pods, args.host, args.port, args.pod_name_prefix))
    except OSError as e:
        sys.stderr.write(f"epp-sim: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
