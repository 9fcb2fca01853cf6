"""The reference scenario end to end: manifests/' v1alpha2 objects → epp serve → Envoy → epp-sim pods.

The InferencePool and InferenceModel are read from ``manifests/scenario/overlays/v1alpha2/
inference.yaml`` and created through the API, unchanged except for one field: the pool's
``targetPortNumber`` (8000 in the manifest) becomes a port the first simulator pod got from
the OS, because a fixed port may be taken on this machine.  The Pods carry the labels of the
scenario's vLLM Deployment (``manifests/scenario/base/vllm-llama2-7b-pool.yaml``), get
loopback IPs 127.0.0.2, 127.0.0.3, 127.0.0.4 (there is no kubelet: the test sets ``podIP`` and
``Ready`` through the status subresource) and are each backed by an ``epp-sim`` process bound
to that address and port.  ``epp serve`` runs as manifests/epp/rbac.yaml's ServiceAccount;
Envoy routes through epp to an ORIGINAL_DST cluster (``x-gateway-destination-endpoint``).
Every address anything here contacts is in 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tools.kube.admin import V1ALPHA2, Admin
from tools.kube.cluster import KubeCluster

from epp.config import PoolFile
from epp.discovery.kubernetes import V1ALPHA2_GROUP
from epp.envoy.config import render_bootstrap
from epp.envoy.process import EnvoyProcess
from epp.wire import DESTINATION_HEADER

from .kube_support import WAIT_S, epp_credentials, start_kube_serve
from support.serve import Serving

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
INFERENCE = MANIFESTS / "scenario" / "overlays" / "v1alpha2" / "inference.yaml"
VLLM = MANIFESTS / "scenario" / "base" / "vllm-llama2-7b-pool.yaml"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")


def manifest(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == kind]
    return doc


POOL = manifest(INFERENCE, "InferencePool")
MODEL = manifest(INFERENCE, "InferenceModel")
POD_LABELS: dict[str, str] = manifest(VLLM, "Deployment")["spec"]["template"]["metadata"]["labels"]
POOL_NAME: str = POOL["metadata"]["name"]
MODEL_NAME: str = MODEL["spec"]["modelName"]
PODS = {f"{POOL_NAME}-{x}": f"127.0.0.{i}" for i, x in enumerate("abc", start=2)}  # Pod name → podIP
A, B, C = PODS


# ---- the model-server pods: one epp-sim process per pod IP ---------------------------------
@dataclass
class SimPod:
    """An ``epp-sim`` process serving one Pod's IP; its sim pod is named ``<pod>-0``."""

    pod: str
    ip: str
    port: int
    proc: asyncio.subprocess.Process

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def served_by(self) -> str:
        return f"{self.pod}-0"  # the sim's x-sim-pod header

    async def completed(self, http: aiohttp.ClientSession) -> int:
        """Requests this pod finished (its own ``vllm:request_success_total``)."""
        async with http.get(f"http://{self.address}/metrics") as resp:
            text = await resp.text()
        return int(sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                       if line.startswith("vllm:request_success_total{")))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


LISTENING = re.compile(rb"^epp-sim pod \S+ listening on (\S+):(\d+)$")


async def start_sim(pod: str, ip: str, port: int) -> SimPod | None:
    """One epp-sim on ``ip:port`` (0: any); None if it could not bind (the port is taken on that IP)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp_sim.cli", "--host", ip, "--port", str(port), "--pod-name-prefix", pod,
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)  # its "listening on" line, or EOF if it exited
    match = LISTENING.match(line.strip())
    if match is None:
        await proc.wait()
        return None
    assert match.group(1).decode() == ip
    return SimPod(pod, ip, int(match.group(2)), proc)


async def start_sims(pods: dict[str, str], attempts: int = 3) -> dict[str, SimPod]:
    """One sim per pod, all on the same port (an InferencePool has one target port): the first
    sim's OS-chosen port, retried with a new one if another address has it taken."""
    for _ in range(attempts):
        (first, ip), *rest = pods.items()
        sims = [await start_sim(first, ip, 0)]
        assert sims[0] is not None
        sims += await asyncio.gather(*(start_sim(pod, ip, sims[0].port) for pod, ip in rest))
        if all(s is not None for s in sims):
            return {s.pod: s for s in sims if s is not None}
        for s in sims:
            if s is not None:
                await s.stop()
    raise AssertionError(f"no port free on all of {sorted(pods.values())} in {attempts} attempts")


@pytest.fixture
async def sims() -> AsyncIterator[dict[str, SimPod]]:
    started = await start_sims(PODS)
    try:
        yield started
    finally:
        for sim in started.values():
            await sim.stop()


# ---- epp's view, from its own /metrics (a foreign process: polled, bounded) --------------
async def epp_inflight(http: aiohttp.ClientSession, epp: Serving) -> dict[str, float]:
    """Endpoint name → epp's in-flight requests, for every endpoint epp has in the pool now."""
    async with http.get(f"http://{epp.address('metrics')}/metrics") as resp:
        text = await resp.text()
    families = text_string_to_metric_families(text)
    (family,) = [f for f in families if f.name == "inference_pool_per_pod_inflight_requests"]
    return {s.labels["model_server_pod"]: s.value for s in family.samples}


async def until(probe: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)  # the pause between two reads of another process's /metrics


def socket_addresses(node: Any) -> list[str]:
    """Every ``socket_address.address`` in an Envoy bootstrap."""
    if isinstance(node, dict):
        found = [node["socket_address"]["address"]] if "socket_address" in node else []
        return found + [a for v in node.values() for a in socket_addresses(v)]
    if isinstance(node, list):
        return [a for v in node for a in socket_addresses(v)]
    return []


def chat(model: str, text: str, **extra: Any) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra})


async def test_reference_scenario_through_envoy_to_the_pods_the_manifests_select(
    kube_cluster: KubeCluster, admin: Admin, namespace: str, sims: dict[str, SimPod], tmp_path: Path
) -> None:
    ns, port = namespace, sims[A].port
    assert POOL["apiVersion"] == MODEL["apiVersion"] == f"{V1ALPHA2_GROUP}/v1alpha2"
    assert POOL["spec"]["targetPortNumber"] == 8000 and POOL["spec"]["selector"].items() <= POD_LABELS.items()
    await admin.create(V1ALPHA2, "inferencepools", ns, POOL_NAME, {**POOL["spec"], "targetPortNumber": port})
    await admin.create(V1ALPHA2, "inferencemodels", ns, MODEL["metadata"]["name"], MODEL["spec"])
    for pod in (A, B):
        await admin.create_pod(ns, pod, POD_LABELS)
        await admin.set_pod_status(ns, pod, PODS[pod], ready=True)
    kubeconfig = await epp_credentials(kube_cluster, admin, ns, tmp_path / "epp.kubeconfig")
    epp = await start_kube_serve(kubeconfig, ns, POOL_NAME, "--pool-group", V1ALPHA2_GROUP)
    envoy: EnvoyProcess | None = None
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    try:
        assert (epp.ready["discovery"], epp.ready["pool"], epp.ready["endpoints"]) == ("kubernetes", POOL_NAME, 2)
        bootstrap = render_bootstrap(
            PoolFile.model_validate({"pool": {"name": POOL_NAME, "failureMode": POOL["spec"]["extensionRef"]
                                              ["failureMode"]}}),
            listen_port=0, epp_address=epp.address("grpc"), lb="original-dst",
        )
        pool_cluster = bootstrap["static_resources"]["clusters"][0]
        assert (pool_cluster["type"], pool_cluster["original_dst_lb_config"]["http_header_name"]) == (
            "ORIGINAL_DST", DESTINATION_HEADER)  # Envoy dials the address epp picked, nothing else
        addresses = socket_addresses(bootstrap)
        assert len(addresses) == 3  # admin, listener, epp
        every_ip = IPV4.findall(yaml.safe_dump(bootstrap))
        assert every_ip and all(ipaddress.ip_address(a) in LOOPBACK for a in [*addresses, *every_ip])
        envoy = EnvoyProcess(bootstrap)
        await envoy.start()
        url = f"http://{await envoy.listener_address()}/v1/chat/completions"

        async def post(model: str, text: str) -> tuple[int, str, dict[str, Any]]:
            async with http.post(url, data=chat(model, text), headers={"content-type": "application/json"}) as r:
                return r.status, r.headers.get("x-sim-pod", ""), orjson.loads(await r.read())

        async def send(n: int, tag: str) -> list[str]:
            """n requests for the scenario's model; the sim pods that served them."""
            served = []
            for i in range(n):
                status, by, doc = await post(MODEL_NAME, f"{tag} {i}: introduce yourself")
                assert status == 200 and doc["model"] == MODEL_NAME, doc
                served.append(by)
            return served

        async def counts() -> dict[str, int]:
            return {pod: await sim.completed(http) for pod, sim in sims.items()}

        async def epp_pool_is(pods: set[str]) -> None:
            async def probe() -> bool:
                return set(await epp_inflight(http, epp)) == pods
            await until(probe, f"epp's pool = {sorted(pods)}")

        by = {sim.served_by: pod for pod, sim in sims.items()}
        await epp_pool_is({A, B})
        served = await send(6, "first")
        assert {by[s] for s in served} <= {A, B}  # only the two Ready pods the pool selects
        assert await counts() == {A: served.count(sims[A].served_by), B: served.count(sims[B].served_by), C: 0}

        # A pod turned NotReady stops receiving traffic.
        await admin.set_pod_status(ns, A, PODS[A], ready=False)
        await epp_pool_is({B})
        before = await counts()
        assert set(await send(4, "second")) == {sims[B].served_by}
        assert await counts() == {**before, B: before[B] + 4}

        # A new Ready pod starts receiving it (here the only one left, so every request is its).
        await admin.create_pod(ns, C, POD_LABELS)
        await admin.set_pod_status(ns, C, PODS[C], ready=True)
        await epp_pool_is({B, C})
        await admin.set_pod_status(ns, B, PODS[B], ready=False)
        await epp_pool_is({C})
        assert set(await send(4, "third")) == {sims[C].served_by}
        assert await counts() == {**before, B: before[B] + 4, C: 4}

        # A model the InferenceModel does not allow: epp answers 404 (the sim would serve this adapter).
        status, served_by, doc = await post("sql-lora", "not in the allowlist")
        assert (status, served_by, doc["error"]["code"]) == (404, "", 404)
        assert "sql-lora" in doc["error"]["message"]
        assert (await counts())[C] == 4

        # In flight while a response streams; back to 0 once it has ended.
        async with http.post(url, data=chat(MODEL_NAME, "a long answer", stream=True, max_tokens=100),
                             headers={"content-type": "application/json"}) as r:
            assert r.status == 200 and r.headers["x-sim-pod"] == sims[C].served_by
            await r.content.readline()  # the first event has arrived: the request is mid-stream

            async def one_in_flight() -> bool:
                return (await epp_inflight(http, epp)).get(C) == 1
            await until(one_in_flight, "one request in flight on the new pod")
            body = await r.read()
        assert body.rstrip().endswith(b"data: [DONE]")

        async def none_in_flight() -> bool:
            return await epp_inflight(http, epp) == {C: 0}
        await until(none_in_flight, "in-flight back to 0")

        # What Envoy dialled: only the pods epp picked (the 404 never went upstream).
        log_path = envoy.stdout_path

        async def logged() -> bool:
            text = await asyncio.to_thread(log_path.read_text)
            return text.count("POST /v1/chat/completions") == 16
        await until(logged, "16 access-log lines")
        hosts = Counter(re.findall(r" host=(\S+)", await asyncio.to_thread(log_path.read_text)))
        final = await counts()
        assert final[C] == 5 and sum(final.values()) == 15
        assert hosts == Counter({"-": 1, **{sims[p].address: n for p, n in final.items() if n}})
    finally:
        await http.close()
        if envoy is not None:
            await envoy.aclose()
        await epp.kill()
