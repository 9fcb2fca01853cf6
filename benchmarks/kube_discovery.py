"""Kubernetes discovery, measured end to end: a real kube-apiserver, a real `epp serve`, its ext_proc port.

What each row measures (every time from the change at the API server to what epp *does*,
seen from outside epp over its gRPC ports; percentiles as in `_stats.py`):

- `pod_ready_to_routed`: a Pod's status PATCH (podIP set, `Ready=True`) is sent → the first
  ext_proc request that epp routes to that pod.  The probe is a body-less GET stream whose
  subset hint (`envoy.lb.subset_hint`, the EPP protocol's destination subset) names only that
  pod's address, so epp's answer is deterministic: the pod's address once epp has it as an
  endpoint, 503 ("nothing matches the subset") before.  Another Ready pod keeps the pool
  non-empty throughout, as in a real pool.
- `pod_notready_to_unrouted` / `pod_deleted_to_unrouted`: the status PATCH (`Ready=False`) or
  the DELETE is sent → the first probe that epp no longer routes to the pod (503).
- `leader_killed_to_standby_serving` / `leader_sigterm_to_standby_serving`: two
  `epp serve --ha-enable-leader-election` processes; the leader is SIGKILLed (or SIGTERMed)
  → the other one's gRPC health `readiness` turns SERVING (a Watch stream).  The leader is
  replaced by a fresh standby before each trial.
- `apiserver_restart`: kube-apiserver stopped and started on the same port and etcd, until
  its `/readyz` answers (epp stays up throughout and keeps routing to the pods it knows).
- `apiserver_ready_to_change_routed`: the API server is ready again → a pod made Ready at
  that moment is routed to; this is how long epp takes to resume following changes (its
  watches reconnect with backoff).
- `api_write`: the PATCH or DELETE itself (sent → answered), included in the three pod rows:
  the API server's share of them.
- `probe_rtt`: one probe (open stream, headers, epp's answer): the resolution of the above.

Every process binds 127.0.0.1; pod IPs are 127.0.0.x and nothing is dialled there (scraping
is off: no model server is needed to route a body-less request).  Uses the apiserver/etcd
harness in tools/kube (built once with Go, cached; `python -m tools.kube.build`).

    python benchmarks/kube_discovery.py [--trials 20] [--failover-trials 5] [--restart-trials 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
import uvloop
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from _cli import ArgumentParser, Output, duration, positive_int
from _stats import percentile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the repository root, never tests/

from tools.kube.admin import Admin
from tools.kube.build import BuildFailed, ToolMissing, ensure_etcd, ensure_kube_apiserver
from tools.kube.cluster import ClusterError, KubeCluster

from epp.discovery._kube import new_api_client
from epp.wire import DESTINATION_HEADER, SUBSET_HINT_NAMESPACE, SUBSET_KEY

BENCH = "kube_discovery"
REPO = Path(__file__).resolve().parents[1]
RBAC = REPO / "manifests" / "epp" / "rbac.yaml"  # epp runs with exactly the manifests' Role
NS, POOL, LABELS, PORT = "bench", "bench-pool", {"app": "bench"}, 8000
ANCHOR, ANCHOR_IP = "anchor", "127.0.0.2"  # always Ready: the pool is never empty
SUBJECT, SUBJECT_IP = "subject", "127.0.0.3"  # the pod that comes and goes
SUBJECT_ADDRESS = f"{SUBJECT_IP}:{PORT}"
V1 = ("inference.networking.k8s.io", "v1")
SERVING = health_pb2.HealthCheckResponse.SERVING
PROBE_PAUSE_S = 0.001  # between two probes, so the probing does not starve epp's own event loop
WAIT_S = 30.0  # any single expected change; beyond it the run fails


class BenchError(RuntimeError):
    """The measurement could not be made (a process died, an expected change never came)."""


# ---- epp serve ----------------------------------------------------------------------------
@dataclass(eq=False)
class Epp:
    proc: asyncio.subprocess.Process
    grpc_port: int
    health_port: int
    channel: grpc.aio.Channel
    health_channel: grpc.aio.Channel

    @property
    def extproc(self) -> pb_grpc.ExternalProcessorStub:
        return pb_grpc.ExternalProcessorStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.health_channel)

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.proc.wait(), 40)
        except TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
        await self.channel.close()
        await self.health_channel.close()
        return code


async def start_epp(kubeconfig: Path, log: Path, *extra: str) -> Epp:
    """`epp serve --pool-name` up to its ready line (one JSON line on stdout); its log goes to ``log``."""
    err = await asyncio.to_thread(log.open, "ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "epp", "serve", "--pool-name", POOL, "--pool-namespace", NS,
            "--kubeconfig", str(kubeconfig), "--grpc-port", "0", "--grpc-health-port", "0", "--metrics-port", "0",
            "--bind-address", "127.0.0.1", "--secure-serving=false", "--refresh-metrics-interval", "0",
            "--log-level", "warning", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=err, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        err.close()  # the child has its own copy
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), WAIT_S)
        ready = orjson.loads(line) if line else {}
    except (TimeoutError, orjson.JSONDecodeError):
        ready = {}
    if ready.get("event") != "ready":
        if proc.returncode is None:
            proc.kill()
        code = await proc.wait()
        text = await asyncio.to_thread(log.read_text, errors="replace")
        tail = text.strip().splitlines()[-1:] or [f"exit code {code}"]
        raise BenchError(f"epp serve did not start: {tail[0]}")
    return Epp(proc, int(ready["grpc_port"]), int(ready["health_port"]),
               grpc.aio.insecure_channel(f"127.0.0.1:{ready['grpc_port']}"),
               grpc.aio.insecure_channel(f"127.0.0.1:{ready['health_port']}"))


# ---- the probe: one body-less GET ext_proc stream, restricted to one address ---------------
def probe_message(subset: str) -> Any:
    headers = {":method": "GET", ":path": "/v1/models", ":authority": "bench", ":scheme": "http"}
    hint = struct_pb2.Struct()
    hint.update({SUBSET_KEY: [subset]})
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[SUBSET_HINT_NAMESPACE].CopyFrom(hint)
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=True),
        metadata_context=metadata,
    )


class Prober:
    """Asks epp, over and over, whether it routes to the subject pod; keeps every probe's round trip."""

    def __init__(self, epp: Epp) -> None:
        self.stub = epp.extproc
        self.message = probe_message(SUBJECT_ADDRESS)
        self.rtts: list[float] = []
        self.writes: list[float] = []  # each timed change's own API round trip, before epp can see it

    async def routes_to_subject(self) -> bool:
        started = time.perf_counter()
        call = self.stub.Process()
        try:
            await call.write(self.message)
            reply = await call.read()
        finally:
            call.cancel()  # what Envoy does when the client goes away: epp releases the pick
        self.rtts.append(time.perf_counter() - started)
        if reply.WhichOneof("response") == "immediate_response":
            return False  # 503: no endpoint matches the subset hint
        mutation = reply.request_headers.response.header_mutation
        picked = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}.get(DESTINATION_HEADER)
        if picked != SUBJECT_ADDRESS:
            raise BenchError(f"epp routed a probe restricted to {SUBJECT_ADDRESS} to {picked}")
        return True

    async def until(self, routed: bool, started: float) -> float:
        """Seconds from ``started`` (perf_counter) to the first probe answering ``routed``."""
        deadline = started + WAIT_S
        while await self.routes_to_subject() != routed:
            if time.perf_counter() > deadline:
                raise BenchError(f"epp {'never' if routed else 'still'} routes to {SUBJECT} after {WAIT_S:.0f}s")
            await asyncio.sleep(PROBE_PAUSE_S)
        return time.perf_counter() - started


# ---- the measurements --------------------------------------------------------------------------
async def timed(change: Callable[[], Awaitable[Any]], prober: Prober, routed: bool) -> float:
    started = time.perf_counter()
    await change()
    prober.writes.append(time.perf_counter() - started)
    return await prober.until(routed, started)


async def pod_trials(admin: Admin, prober: Prober, trials: int) -> dict[str, list[float]]:
    ready: list[float] = []
    not_ready: list[float] = []
    deleted: list[float] = []
    await admin.create_pod(NS, SUBJECT, LABELS)
    for _ in range(trials):
        ready.append(await timed(lambda: admin.set_pod_status(NS, SUBJECT, SUBJECT_IP, ready=True), prober, True))
        not_ready.append(
            await timed(lambda: admin.set_pod_status(NS, SUBJECT, SUBJECT_IP, ready=False), prober, False))
    for _ in range(trials):
        await admin.set_pod_status(NS, SUBJECT, SUBJECT_IP, ready=True)
        await prober.until(True, time.perf_counter())  # routed again: the starting state
        deleted.append(await timed(lambda: admin.delete_pod(NS, SUBJECT), prober, False))
        await admin.create_pod(NS, SUBJECT, LABELS)
    return {"pod_ready_to_routed": ready, "pod_notready_to_unrouted": not_ready, "pod_deleted_to_unrouted": deleted,
            "api_write": list(prober.writes)}


async def wait_serving(epp: Epp, timeout: float = WAIT_S) -> None:
    call = epp.health.Watch(health_pb2.HealthCheckRequest(service="readiness"))
    try:
        async with asyncio.timeout(timeout):
            async for answer in call:
                if answer.status == SERVING:
                    return
        raise BenchError("health Watch ended")
    finally:
        call.cancel()


async def first_serving(replicas: list[Epp]) -> Epp:
    waits = {asyncio.ensure_future(wait_serving(r)): r for r in replicas}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        first.result()
        return waits[first]
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def failover_trials(kubeconfig: Path, workdir: Path, trials: int, lease: tuple[float, float, float],
                          say: Callable[[str], None]) -> dict[str, list[float]]:
    duration_s, renew_s, retry_s = lease
    ha = ("--ha-enable-leader-election", "--lease-duration", f"{duration_s}s",
          "--lease-renew-deadline", f"{renew_s}s", "--lease-retry-period", f"{retry_s}s")
    logs = iter(workdir / f"epp-ha-{i}.log" for i in range(10_000))
    killed: list[float] = []
    stopped: list[float] = []
    replicas = list(await asyncio.gather(*(start_epp(kubeconfig, next(logs), *ha) for _ in range(2))))
    try:
        leader = await first_serving(replicas)
        for i in range(2 * trials):
            standby = next(r for r in replicas if r is not leader)
            how = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
            started = time.perf_counter()
            leader.proc.send_signal(how)
            await wait_serving(standby)
            (killed if how is signal.SIGKILL else stopped).append(time.perf_counter() - started)
            await leader.stop()
            replicas.remove(leader)
            say(f"  leader {how.name}: standby serving after {(time.perf_counter() - started):.2f}s")
            leader = standby
            replicas.append(await start_epp(kubeconfig, next(logs), *ha))  # the next trial's standby
    finally:
        for r in replicas:
            await r.stop(signal.SIGKILL)
    return {"leader_killed_to_standby_serving": killed, "leader_sigterm_to_standby_serving": stopped}


async def restart_trials(cluster: KubeCluster, admin: Admin, prober: Prober, trials: int,
                         say: Callable[[str], None]) -> dict[str, list[float]]:
    restarts: list[float] = []
    resumed: list[float] = []
    await admin.set_pod_status(NS, SUBJECT, SUBJECT_IP, ready=False)
    await prober.until(False, time.perf_counter())
    for _ in range(trials):
        restarts.append(await asyncio.to_thread(cluster.restart_apiserver))
        resumed.append(await timed(lambda: admin.set_pod_status(NS, SUBJECT, SUBJECT_IP, ready=True), prober, True))
        say(f"  apiserver restarted in {restarts[-1]:.2f}s; a change then routed after {resumed[-1]:.2f}s")
        await admin.set_pod_status(NS, SUBJECT, SUBJECT_IP, ready=False)
        await prober.until(False, time.perf_counter())
    return {"apiserver_restart": restarts, "apiserver_ready_to_change_routed": resumed}


async def keep_routing_anchor(epp: Epp, stop: asyncio.Event, failures: list[int]) -> None:
    """During the restarts: epp keeps routing to the pods it knows (counted, not measured)."""
    stub, message = epp.extproc, probe_message(f"{ANCHOR_IP}:{PORT}")
    while not stop.is_set():
        call = stub.Process()
        try:
            await call.write(message)
            reply = await call.read()
            if reply.WhichOneof("response") == "immediate_response":
                failures[0] += 1
        except grpc.aio.AioRpcError:
            failures[0] += 1
        finally:
            call.cancel()
        failures[1] += 1
        await asyncio.sleep(0.05)


# ---- set-up and report ------------------------------------------------------------------------
def row(measure: str, values: list[float]) -> dict[str, Any]:
    return {"bench": BENCH, "measure": measure, "trials": len(values), "p50_ms": round(percentile(values, 50) * 1e3, 2),
            "max_ms": round(max(values) * 1e3, 2), "min_ms": round(min(values) * 1e3, 2)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=positive_int, default=20, help="trials of each pod change (20)")
    ap.add_argument("--failover-trials", type=positive_int, default=5,
                    help="leader hand-overs of each kind, SIGKILL and SIGTERM (5)")
    ap.add_argument("--restart-trials", type=positive_int, default=3, help="kube-apiserver restarts (3)")
    ap.add_argument("--lease-duration", type=duration, default=2.0, help="epp's --lease-duration (2s)")
    ap.add_argument("--lease-renew-deadline", type=duration, default=1.5, help="epp's --lease-renew-deadline (1.5s)")
    ap.add_argument("--lease-retry-period", type=duration, default=0.2, help="epp's --lease-retry-period (0.2s)")
    ap.add_argument("--logs", type=Path, default=None, metavar="DIR",
                    help="keep every process's log (epp, etcd, kube-apiserver) in DIR (default: a temporary directory)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row on stdout; table to stderr")
    args = ap.parse_args(argv)
    if not 0 < args.lease_retry_period < args.lease_renew_deadline < args.lease_duration:
        ap.error("needs --lease-retry-period < --lease-renew-deadline < --lease-duration")
    return args


async def measure(args: argparse.Namespace, out: Output, workdir: Path) -> list[dict[str, Any]]:
    try:
        etcd, apiserver = await asyncio.to_thread(lambda: (ensure_etcd(), ensure_kube_apiserver()))
    except (ToolMissing, BuildFailed) as exc:
        raise BenchError(f"no kube-apiserver/etcd: {str(exc).splitlines()[0]}") from None
    cluster = await asyncio.to_thread(KubeCluster(workdir / "kube", apiserver, etcd).start)
    results: dict[str, list[float]] = {}
    try:
        api = await new_api_client(str(cluster.kubeconfig))
        admin = Admin(api)
        try:
            await admin.install_crd("inferencepools.inference.networking.k8s.io")
            await admin.create_namespace(NS)
            await admin.apply_rbac(NS, RBAC.read_text())
            (account,) = [d["metadata"]["name"] for d in yaml.safe_load_all(RBAC.read_text())
                          if d["kind"] == "ServiceAccount"]
            token = await admin.service_account_token(NS, account)
            kubeconfig = cluster.write_kubeconfig(workdir / "epp.kubeconfig", token, account)
            await admin.create(V1, "inferencepools", NS, POOL, {
                "selector": {"matchLabels": LABELS}, "targetPorts": [{"number": PORT}],
                "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
            })
            await admin.create_pod(NS, ANCHOR, LABELS)
            await admin.set_pod_status(NS, ANCHOR, ANCHOR_IP, ready=True)
            epp = await start_epp(kubeconfig, workdir / "epp.log")
            try:
                prober = Prober(epp)
                out.say(f"pod changes: {args.trials} trials each")
                results |= await pod_trials(admin, prober, args.trials)
                out.say(f"leader election (lease {args.lease_duration:g}s, renew {args.lease_renew_deadline:g}s, "
                        f"retry {args.lease_retry_period:g}s): {args.failover_trials} hand-overs of each kind")
                lease = (args.lease_duration, args.lease_renew_deadline, args.lease_retry_period)
                results |= await failover_trials(kubeconfig, workdir, args.failover_trials, lease, out.say)
                out.say(f"kube-apiserver restarts: {args.restart_trials}")
                stop, counts = asyncio.Event(), [0, 0]
                during = asyncio.create_task(keep_routing_anchor(epp, stop, counts))
                try:
                    results |= await restart_trials(cluster, admin, prober, args.restart_trials, out.say)
                finally:
                    stop.set()
                    await during
                out.say(f"  while the apiserver was down or restarting, epp answered {counts[1] - counts[0]} "
                        f"of {counts[1]} probes for a known pod")
                results["probe_rtt"] = prober.rtts
            finally:
                await epp.stop()
        finally:
            await api.close()
    finally:
        await asyncio.to_thread(cluster.stop)
    return [row(name, values) for name, values in results.items()]


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Output(args.json)
    with tempfile.TemporaryDirectory(prefix="kube-discovery-") as d:
        workdir = args.logs or Path(d)
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            rows = await measure(args, out, workdir)
        except (BenchError, ClusterError, OSError) as exc:
            print(f"kube_discovery: {exc}", file=sys.stderr)
            return 1
    out.say("")
    out.say(f"{'measure':<36} {'trials':>6} {'p50 ms':>9} {'max ms':>9} {'min ms':>9}")
    for r in rows:
        out.row(r)
        out.say(f"{r['measure']:<36} {r['trials']:>6} {r['p50_ms']:>9.1f} {r['max_ms']:>9.1f} {r['min_ms']:>9.1f}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(uvloop.run(main()))
