"""`epp demo`: the traffic-mirroring reference scenario on one machine.

Starts, on 127.0.0.1 with free ports: a production pool (3 simulated vLLM pods, H100
profile), a shadow pool (2 pods, A100 profile, so the comparison shows a difference),
`epp serve` for the production pool (TLS, as Envoy AI Gateway expects), and a real
Envoy with the ext_proc filter in FULL_DUPLEX_STREAMED mode and a route that mirrors
every request to the shadow cluster.  Then it sends the scenario's request and a burst
of mixed traffic, and verifies from the pods' own metrics that every production request
was served once and mirrored once.  Every process it starts is stopped on exit,
including on Ctrl-C.  Pods run as separate processes, as real pods would.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson
import yaml

from epp.config import load_pool_file
from epp.envoy.config import MirrorMode, render_bootstrap
from epp.envoy.process import EnvoyProcess
from epp.mirror_report import PodSnapshot, pool_report, render_table, snapshot

MODEL = "/model/llama2"
POOL = "vllm-llama2-7b-pool"
SHADOW = "vllm-llama2-7b-pool-1"
ADAPTERS = ("sql-lora", "tweet-summary")
SCENARIO_REQUEST = {
    "model": MODEL,
    "max_completion_tokens": 100,
    "temperature": 0,
    "messages": [{"role": "user", "content": "introduce yourself"}],
}
_LISTENING = re.compile(r"epp-sim pod (\S+) listening on (\S+)")
_EPP_READY = re.compile(r'^(\{"event": "ready".*\})$', re.MULTILINE)  # epp serve's readiness line


class DemoError(Exception):
    pass


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log: Path


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


class Demo:
    def __init__(
        self,
        *,
        requests: int,
        concurrency: int,
        out: TextIO,
        workdir: Path,
        keep: bool = False,
        seed: int = 1,
        mirror: MirrorMode = "load-aware",
    ) -> None:
        self.keep = keep
        self.mirror: MirrorMode = mirror
        self.requests = requests
        self.concurrency = concurrency
        self.out = out
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.children: list[Child] = []
        self.pod_names: dict[str, str] = {}
        self.envoy: EnvoyProcess | None = None

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def _spawn(
        self, name: str, argv: Sequence[str], pattern: re.Pattern[str], stream: str, count: int = 1
    ) -> list[re.Match[str]]:
        """Start a child whose output goes to a log file; wait for ``count`` lines matching ``pattern``."""
        log = self.workdir / f"{name}.log"
        fh = await asyncio.to_thread(open, log, "wb")  # handed to the child process, closed below
        try:
            kwargs: dict[str, Any] = {"stdout": fh, "stderr": fh} if stream == "both" else {stream: fh}
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True, **kwargs
            )
        finally:
            fh.close()
        self.children.append(Child(name, proc, log))
        deadline = time.monotonic() + 30
        while True:
            text = await asyncio.to_thread(log.read_text, "utf-8", "replace")
            found = list(pattern.finditer(text))
            if len(found) >= count:
                return found[:count]
            if proc.returncode is not None or time.monotonic() > deadline:
                raise DemoError(f"{name} did not start; last lines of {log}:\n" + "\n".join(text.splitlines()[-10:]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.05)  # a child's startup output: poll its log briefly

    async def start_pods(
        self, name: str, pods: int, profile: str, seed: int, *extra: str, prefix: str = "pod"
    ) -> list[str]:
        argv = [_tool("epp-sim"), "--port", "0", "--pods", str(pods), "--pod-name-prefix", f"{name}-{prefix}"]
        argv += ["--model", MODEL, "--profile", profile, "--seed", str(seed), *extra]
        found = await self._spawn(f"{name}-{prefix}", argv, _LISTENING, "both", pods)
        for m in found:
            self.pod_names[m.group(2)] = m.group(1)
        return [m.group(2) for m in found]

    async def start(self) -> tuple[str, list[str], list[str], int]:
        self.say(f"▶ starting production pool {POOL}: 3 simulated vLLM pods (H100 profile)")
        primary = await self.start_pods(POOL, 3, "h100-8b", 1)
        self.say(f"  {', '.join(primary)}")
        self.say(
            f"▶ starting shadow pool {SHADOW}: 2 simulated vLLM pods (A100 profile), uneven: "
            "the second runs at most 2 sequences at a time"
        )
        shadow = await self.start_pods(SHADOW, 1, "a100-8b", 2)
        shadow += await self.start_pods(SHADOW, 1, "a100-8b", 3, "--max-num-seqs", "2", prefix="small")
        self.say(f"  {', '.join(shadow)}")
        pool_path = self.workdir / "pool.yaml"
        pool_doc = {
            "pool": {"name": POOL, "engine": "vllm", "failureMode": "FailClose", "endpoints": primary},
            "models": [
                {"modelName": MODEL, "criticality": "Critical", "targetModels": [{"name": MODEL, "weight": 100}]},
                *({"modelName": a, "criticality": "Standard"} for a in ADAPTERS),
            ],
            "mirror": {"name": SHADOW, "endpoints": shadow},
        }
        await asyncio.to_thread(pool_path.write_text, yaml.safe_dump(pool_doc, sort_keys=False))
        self.say("▶ starting epp serve (ext_proc over TLS with a self-signed certificate)")
        argv = [
            _tool("epp"),
            "serve",
            "--pool-file",
            str(pool_path),
            "--grpc-port",
            "0",
            "--grpc-health-port",
            "0",
            "--metrics-port",
            "0",
            "--bind-address",
            "127.0.0.1",
            "--secure-serving=true",
        ]
        (m,) = await self._spawn("epp", argv, _EPP_READY, "both")
        ready = orjson.loads(m.group(1))
        grpc_port, metrics_port = int(ready["grpc_port"]), int(ready["metrics_port"])
        self.say(f"  ext_proc 127.0.0.1:{grpc_port}, metrics http://127.0.0.1:{metrics_port}/metrics")
        how = "load-aware: epp picks the shadow pod" if self.mirror == "load-aware" else "plain round-robin"
        self.say(
            f"▶ starting Envoy 1.40: ext_proc lean (request body buffered, response headers only), override_host "
            f"pool cluster, 100 % mirror ({how})"
        )
        config = render_bootstrap(
            load_pool_file(pool_path),
            listen_port=0,
            epp_address=f"127.0.0.1:{grpc_port}",
            body_mode="lean",
            lb="override-host",
            epp_tls=True,
            access_log_path=str(self.workdir / "envoy-access.log"),
            mirror_lb=self.mirror,
        )
        self.envoy = EnvoyProcess(config, workdir=self.workdir / "envoy")
        await self.envoy.start()
        gateway = "http://" + await self.envoy.listener_address()
        self.say(f"  gateway {gateway}")
        return gateway, primary, shadow, metrics_port

    def _burst_request(self, i: int) -> tuple[str, dict[str, Any]]:
        model = ADAPTERS[i % 2] if i % 3 == 1 else MODEL
        stream = i % 3 == 2
        prompt = f"Request {i}: summarise the benefits of traffic mirroring in {20 + i % 7} words."
        if i % 2:
            doc: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": 40 + 10 * (i % 5)}
            path = "/v1/completions"
        else:
            doc = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_completion_tokens": 40 + 10 * (i % 5),
            }
            path = "/v1/chat/completions"
        if stream:
            doc["stream"] = True
            doc["stream_options"] = {"include_usage": True}
        return path, doc

    async def burst(self, http: aiohttp.ClientSession, gateway: str) -> list[int]:
        statuses: list[int] = []
        queue = list(range(self.requests))
        done = 0

        tty = self.out.isatty()

        def bar() -> None:
            width = 30
            filled = width * done // max(1, self.requests)
            line = f"  [{'#' * filled}{'.' * (width - filled)}] {done}/{self.requests}"
            if tty:
                self.out.write("\r" + line)
            elif done == self.requests or done % max(1, self.requests // 4) == 0:
                self.out.write(line + "\n")  # not a terminal: a few plain lines instead of redraws
            self.out.flush()

        async def worker() -> None:
            nonlocal done
            while queue:
                path, doc = self._burst_request(queue.pop(0))
                async with http.post(gateway + path, json=doc) as r:
                    await r.read()
                    statuses.append(r.status)
                done += 1
                bar()

        bar()
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        if tty:
            self.out.write("\n")
        return statuses

    async def wait_mirrored(
        self, http: aiohttp.ClientSession, shadow: list[str], expected: int, base_s: list[PodSnapshot]
    ) -> None:
        """Mirrors are fire-and-forget: wait (bounded) until the shadow pool finished as many."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            snap_s = await snapshot(http, shadow)
            if sum(a.finished - b.finished for a, b in zip(snap_s, base_s, strict=True)) >= expected:
                return
            await asyncio.sleep(0.2)  # other processes' progress, read from their /metrics

    async def run(self) -> int:
        gateway, primary, shadow, epp_metrics_port = await self.start()
        purls, surls = [f"http://{a}" for a in primary], [f"http://{a}" for a in shadow]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            base_p, base_s = await snapshot(http, purls), await snapshot(http, surls)
            t0 = time.monotonic()
            self.say(
                '\n▶ the scenario\'s request: POST /v1/chat/completions, model /model/llama2, "introduce yourself"'
            )
            async with http.post(gateway + "/v1/chat/completions", json=SCENARIO_REQUEST) as r:
                first_status, first = r.status, await r.read()
            answer = orjson.loads(first) if first_status == 200 else {}
            content = answer.get("choices", [{}])[0].get("message", {}).get("content", "") if answer else ""
            self.say(f"  HTTP {first_status}, model {answer.get('model', '-')!r}, usage {answer.get('usage')}")
            self.say(f"  answer: {content[:160]}{'…' if len(content) > 160 else ''}")
            self.say(
                f"\n▶ a burst of {self.requests} mixed requests (chat and completions, 1/3 streaming, "
                f"1/3 naming the {' / '.join(ADAPTERS)} adapters), {self.concurrency} at a time"
            )
            statuses = await self.burst(http, gateway)
            sent = 1 + len(statuses)
            ok = [first_status, *statuses].count(200)
            await self.wait_mirrored(http, surls, sent, base_s)
            elapsed = time.monotonic() - t0
            after_p, after_s = await snapshot(http, purls), await snapshot(http, surls)
            async with http.get(f"http://127.0.0.1:{epp_metrics_port}/metrics") as r:
                epp_metrics = await r.text()
        prod = pool_report(f"primary ({POOL})", base_p, after_p, elapsed)
        shad = pool_report(f"shadow ({SHADOW})", base_s, after_s, elapsed)
        self.say("\n▶ verification")
        for addresses, report in ((primary, prod), (shadow, shad)):
            for address, n in zip(addresses, report.per_pod_requests, strict=True):
                self.say(f"  {self.pod_names[address]} ({address}): served {n} requests")
        routed = _epp_requests(epp_metrics)
        self.say(f"  client: {ok}/{sent} answered 200; epp routed {routed} requests")
        mirrored = shad.requests == prod.requests == sent
        self.say(
            f"  production pool served {prod.requests}/{sent}; shadow pool received {shad.requests}/{sent} "
            f"mirrored copies → {'every production request was mirrored' if mirrored else 'MIRRORING INCOMPLETE'}"
        )
        self.say("\n" + render_table([prod, shad]))
        if self.keep:
            self.say(f"\n  logs and configs kept in {self.workdir}")
        verified = mirrored and ok == sent and routed == sent
        self.say("\n✔ mirroring verified" if verified else "\n✘ verification failed")
        return 0 if verified else 1

    async def aclose(self) -> None:
        if self.envoy is not None:
            await self.envoy.aclose()
        for child in reversed(self.children):
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                await asyncio.wait_for(child.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()


def _epp_requests(text: str) -> int:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("inference_model_request_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return round(total)


async def run_demo(
    *,
    requests: int = 30,
    concurrency: int = 6,
    keep: bool = False,
    out: TextIO = sys.stdout,
    mirror: MirrorMode = "load-aware",
) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="epp-demo-"))
    demo = Demo(requests=requests, concurrency=concurrency, out=out, workdir=workdir, keep=keep, mirror=mirror)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await demo.run()
    except DemoError as exc:
        out.write(f"\n✘ {exc}\n")
        keep = True
        return 1
    except asyncio.CancelledError:
        out.write("\n✘ interrupted: stopping everything\n")
        return 130
    finally:
        await demo.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
