"""``epp serve --workers N``: N worker processes behind one port, sharing their load.

CPython runs one thread of Python at a time, so one epp process uses about one core however
many it is given.  With ``--workers N`` this parent process:

1. validates the settings (the pool file, the scheduling profile, what workers cannot do):
   a bad pool file exits 2 before any process starts or any port is bound;
2. starts N workers with the ``spawn`` context of :mod:`multiprocessing`.  Each worker is a
   whole :class:`~epp.app.App` (discovery, scrapers, scheduler, servers) given its
   ``Settings`` directly (no argv round trip) in a fresh interpreter (``fork`` would copy
   grpc's and ZMQ's threads and locks; ``forkserver`` would only save the imports, once, at
   start).  Workers bind the same ext_proc and health ports with ``SO_REUSEPORT``: the
   kernel hands each new connection to one of them, so load spreads per connection (Envoy
   must open several, see ``epp envoy-config --ext-proc-max-concurrent-streams``).  A port 0
   is resolved by worker 0 first; the others then bind the number it got.  Worker ``i``
   serves ``/metrics`` on ``--metrics-port`` + ``i`` (each its own port when 0);
3. makes every worker an active-active peer of its siblings (``epp.datalayer.peers``) over
   ``ipc://`` sockets in a private temporary directory: each worker's scheduler sees the
   others' in-flight requests and speculative prefix entries, as replicas in separate pods
   do.  ``--peer-bind tcp://IP:PORT`` still reaches other pods: worker ``i`` publishes on
   PORT + ``i``, and each ``--peers`` entry HOST:PORT is read as HOST:PORT … PORT+N-1
   (the other replicas run the same ``--workers``, as one Deployment's pods do);
4. prints the one ready line once every worker is ready (worker 0's, plus ``workers``,
   ``worker_pids``, ``worker_metrics_ports`` and, with ``--peer-bind``,
   ``worker_peer_ports``), forwards SIGTERM and SIGINT to the workers (each drains as a
   single ``epp serve`` does) and exits with their status.  A worker that exits on its own
   stops the others: the pod restarts whole, as a single-process epp would.

A worker reports readiness to the parent over a private pipe, never on stdout, so stdout
carries exactly one line.  Leader election, ``--grpc-address`` (one Unix socket file) and
``--kv-events-bind`` (one endpoint pods connect to) cannot be shared by several processes:
with ``--workers`` > 1 they are configuration errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from epp.config import Settings, load_pool_file
from epp.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["check", "expand_peers", "serve_workers", "worker_settings"]


def check(settings: Settings) -> None:
    """What the parent can validate before starting anything (``ConfigError``: exit code 2)."""
    import random

    from epp.scheduling import load_config_file
    from epp.scheduling.profile import build_profile, builtin_config

    if settings.workers < 1:
        raise ConfigError(f"--workers {settings.workers}: needs at least 1")
    if settings.ha_enable_leader_election:
        raise ConfigError("--workers > 1 with --ha-enable-leader-election: each worker would be its own candidate")
    if settings.grpc_address:
        raise ConfigError("--workers > 1 with --grpc-address: one Unix socket file cannot be shared by workers")
    if settings.kv_events_bind:
        raise ConfigError("--workers > 1 with --kv-events-bind: pods connect to one endpoint; use --kv-events-port")
    if settings.peers and not settings.peer_bind:
        raise ConfigError("--peers needs --peer-bind (where this replica publishes)")
    if settings.pool_file:
        load_pool_file(settings.pool_file)
    elif not settings.pool_name:
        raise ConfigError("epp serve needs --pool-file or --pool-name")
    if settings.config_file:
        build_profile(load_config_file(settings.config_file), random.Random(), "--config-file")
    else:
        build_profile(builtin_config(settings.scheduling_profile), random.Random(), "profile")
    expand_peers(settings.peer_bind, settings.peers, 0, settings.workers)


def _plus(port: int, i: int) -> int:
    return port + i if port else 0


def expand_peers(peer_bind: str, peers: tuple[str, ...], index: int, workers: int) -> tuple[str, tuple[str, ...]]:
    """Worker ``index``'s ``--peer-bind`` (PORT + index) and ``--peers`` (each HOST:PORT … PORT+workers-1)."""
    if not peer_bind:
        return "", ()
    head, sep, port = peer_bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--peer-bind {peer_bind!r}: expected tcp://IP:PORT")
    expanded = []
    for entry in peers:
        host, sep, p = entry.rpartition(":")
        if not sep or not p.isdigit() or not host:
            raise ConfigError(f"--peers {entry!r}: expected HOST:PORT")
        expanded += [f"{host}:{_plus(int(p), k)}" for k in range(workers)] if int(p) else [entry]
    return f"{head}:{_plus(int(port), index)}", tuple(expanded)


def worker_settings(settings: Settings, index: int, grpc_port: int, health_port: int, ipc: list[str]) -> Settings:
    """Worker ``index``'s settings: the shared ports with SO_REUSEPORT, its own metrics and peer endpoints."""
    peer_bind, peers = expand_peers(settings.peer_bind, settings.peers, index, settings.workers)
    return dataclasses.replace(
        settings,
        grpc_port=grpc_port,
        grpc_health_port=health_port,
        metrics_port=_plus(settings.metrics_port, index),
        reuse_port=True,
        peer_bind=peer_bind,
        peers=peers,
        worker_peer_bind=ipc[index],
        worker_peers=tuple(e for j, e in enumerate(ipc) if j != index),
    )


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when the parent dies (a SIGKILLed parent must not leave workers
    serving on its port: SO_REUSEPORT would let a new epp share it with them)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(settings: Settings, index: int, ready: multiprocessing.connection.Connection, parent: int) -> None:
    """A worker process: one App, its ready line sent to the parent, its exit code as the process's."""
    import uvloop

    from epp.app import App
    from epp.observability.logging import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    _die_with_parent(parent)

    def report(app: App) -> None:
        ready.send({**app.ready_line(), "pid": os.getpid(), "worker": index})
        ready.close()

    async def run() -> int:
        app = App(settings)
        return await app.serve_until_signal(report)

    try:
        code = uvloop.run(run())
    except ConfigError as exc:
        print(f"epp: worker {index}: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _exit_code(process: BaseProcess) -> int:
    code = process.exitcode
    if code is None:
        return 1
    return 128 - code if code < 0 else code  # killed by signal s: 128 + s, as a shell reports it


class _Parent:
    def __init__(self, settings: Settings, directory: str) -> None:
        self.settings = settings
        self.ctx = multiprocessing.get_context("spawn")
        self.ipc = [f"ipc://{directory}/peer-{i}" for i in range(settings.workers)]
        self.procs: list[BaseProcess] = []
        self.readies: list[dict[str, Any]] = []
        self.stopping = False

    def _forward(self, signum: int, _: FrameType | None) -> None:
        self.stopping = True
        for p in self.procs:
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    def _start(self, index: int, grpc_port: int, health_port: int) -> multiprocessing.connection.Connection:
        receive, send = self.ctx.Pipe(duplex=False)
        settings = worker_settings(self.settings, index, grpc_port, health_port, self.ipc)
        process = self.ctx.Process(target=_worker_main, args=(settings, index, send, os.getpid()),
                                   name=f"epp-worker-{index}")  # fmt: skip
        process.start()
        send.close()  # the worker holds the only writer: its exit is EOF here
        self.procs.append(process)
        if self.stopping:  # a signal came while it was being started
            self._forward(signal.SIGTERM, None)
        return receive

    def _await_ready(self, pipes: list[multiprocessing.connection.Connection]) -> bool:
        """Every pipe's ready line, or False as soon as a worker exits first (or a signal stops us)."""
        waiting = list(pipes)
        while waiting:
            for conn in multiprocessing.connection.wait(waiting):
                assert isinstance(conn, multiprocessing.connection.Connection)
                try:
                    self.readies.append(conn.recv())
                except EOFError:
                    return False
                finally:
                    conn.close()
                waiting.remove(conn)
        return not self.stopping

    def _ready_line(self) -> dict[str, Any]:
        by_worker = sorted(self.readies, key=lambda r: int(r["worker"]))
        line = {k: v for k, v in by_worker[0].items() if k not in ("pid", "worker")}
        line["workers"] = len(by_worker)
        line["worker_pids"] = [r["pid"] for r in by_worker]
        line["worker_metrics_ports"] = [r["metrics_port"] for r in by_worker]
        if "peer_port" in line:
            line["worker_peer_ports"] = [r["peer_port"] for r in by_worker]
        return line

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward)
        s = self.settings
        try:
            if s.grpc_port and s.grpc_health_port:  # known ports: every worker at once
                ok = self._await_ready([self._start(i, s.grpc_port, s.grpc_health_port) for i in range(s.workers)])
            else:  # port 0: worker 0 takes a number, the others bind the same
                ok = self._await_ready([self._start(0, s.grpc_port, s.grpc_health_port)])
                if ok:
                    first = self.readies[0]
                    grpc_port, health_port = int(first["grpc_port"]), int(first["health_port"])
                    ok = self._await_ready([self._start(i, grpc_port, health_port) for i in range(1, s.workers)])
            if ok:
                sys.stdout.write(json.dumps(self._ready_line()) + "\n")
                sys.stdout.flush()
                log.info("epp serving with %d workers (pids %s)", s.workers, [p.pid for p in self.procs])
            return self._wait()
        finally:
            for p in self.procs:  # only reached early by an exception in this process
                if p.exitcode is None:
                    p.kill()
                    p.join()

    def _wait(self) -> int:
        """Until every worker has exited; the first one that exits unasked stops the others."""
        running = {p.sentinel: p for p in self.procs}
        codes: list[int] = []  # in the order the workers exited
        while running:
            for sentinel in multiprocessing.connection.wait(list(running)):
                assert isinstance(sentinel, int)
                process = running.pop(sentinel)
                process.join()
                code = _exit_code(process)
                if self.stopping and process.exitcode in (-signal.SIGTERM, -signal.SIGINT):
                    code = 0  # stopped by the forwarded signal before its own handler was in place (starting)
                if not self.stopping:
                    log.error("worker %s exited (code %d) unasked: stopping the others", process.name, code)
                    self._forward(signal.SIGTERM, None)
                    code = code or 1
                codes.append(code)
        return next((c for c in codes if c), 0)


def serve_workers(settings: Settings) -> int:
    """``epp serve --workers N`` (N > 1): the parent process (module docstring); its exit code."""
    check(settings)
    with tempfile.TemporaryDirectory(prefix="epp-workers-") as directory:
        return _Parent(settings, directory).run()
