"""Command line: argument parsing only, producing one immutable ``Settings``.

epp serve         run the endpoint picker; once ready it prints one JSON line on stdout,
                  {"event": "ready", "grpc_port": N, "health_port": N, "metrics_port": N, ...}
                  (logs go to stderr)
epp envoy-config  render an Envoy bootstrap for a pool file
epp check-config  validate a pool file and exit
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from epp import grpcenv
from epp.config import Settings, load_pool_file, parse_bool, parse_duration
from epp.domain import FailureMode
from epp.errors import ConfigError
from epp.wire import MAX_REQUEST_HEADERS

T = TypeVar("T")


def _arg(fn: Callable[[str], T]) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return fn(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = fn.__name__.removeprefix("parse_")
    return convert


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "ki": 1 << 10, "m": 1 << 20, "mi": 1 << 20, "g": 1 << 30, "gi": 1 << 30}
    t = text.strip().lower().removesuffix("b")
    num = t.rstrip("kmgi")
    if not num.isdigit() or t[len(num) :] not in units:
        raise ConfigError(f"invalid size {text!r}: expected e.g. 16Mi or 1048576")
    return int(num) * units[t[len(num) :]]


def _flag(p: argparse.ArgumentParser, name: str, help: str, *, default: bool = False) -> None:
    """A boolean flag written as the Go reference writes them: ``--x``, ``--x=true`` or ``--x=false``."""
    p.add_argument(name, type=_arg(parse_bool), nargs="?", const=True, default=default, metavar="true|false", help=help)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the endpoint picker (ext_proc gRPC server)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--pool-file", help="static pool YAML (re-read when it changes): no Kubernetes")
    where.add_argument("--pool-name", help="the InferencePool to follow through the Kubernetes API server")
    p.add_argument("--pool-namespace", default=None, help="the pool's namespace (default $NAMESPACE, else default)")
    p.add_argument(
        "--pool-group",
        default="inference.networking.k8s.io",
        choices=["inference.networking.k8s.io", "inference.networking.x-k8s.io"],
        help="the InferencePool API group: v1 (inference.networking.k8s.io) or v1alpha2 (…x-k8s.io)",
    )
    p.add_argument(
        "--kubeconfig", default=None, help="kubeconfig outside a cluster (default $KUBECONFIG, else in-cluster)"
    )
    _flag(
        p,
        "--ha-enable-leader-election",
        "one coordination.k8s.io Lease per pool: only the leader reports readiness SERVING",
    )
    p.add_argument("--lease-duration", type=_arg(parse_duration), default=15.0, metavar="DURATION")
    p.add_argument("--lease-renew-deadline", type=_arg(parse_duration), default=10.0, metavar="DURATION")
    p.add_argument("--lease-retry-period", type=_arg(parse_duration), default=2.0, metavar="DURATION")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N worker processes (one per core), all serving ext_proc and health on the same ports (SO_REUSEPORT: "
        "the kernel spreads connections, so Envoy must open several) and sharing their in-flight load as peers; "
        "worker i serves /metrics on --metrics-port + i. Default 1: one process",
    )
    p.add_argument("--grpc-port", type=int, default=9002)
    p.add_argument("--grpc-health-port", type=int, default=9003)
    p.add_argument("--metrics-port", type=int, default=9090)
    p.add_argument(
        "--grpc-address",
        default=None,
        metavar="unix:///PATH",
        help="also serve ext_proc and gRPC health on this Unix socket, plaintext (Envoy in the same pod)",
    )
    p.add_argument("--bind-address", default="0.0.0.0")
    _flag(p, "--secure-serving", "TLS on the ext_proc port (self-signed unless --cert-path)", default=True)
    p.add_argument("--cert-path", default=None, help="directory with tls.crt and tls.key")
    p.add_argument("--config-file", default=None, help="scheduling profile YAML (EndpointPickerConfig)")
    p.add_argument(
        "--scheduling-profile",
        default="epp-default",
        help="built-in profile when no --config-file: epp-default, gie-default, least-inflight, round-robin, "
        "random; with KV events epp-precise (epp-sim's tokenizer) or epp-precise-vllm (the model server's /tokenize)",
    )
    p.add_argument("--refresh-metrics-interval", type=_arg(parse_duration), default=0.05, metavar="DURATION")
    p.add_argument("--metrics-staleness-threshold", type=_arg(parse_duration), default=2.0, metavar="DURATION")
    p.add_argument("--pool-file-poll-interval", type=_arg(parse_duration), default=1.0, metavar="DURATION")
    p.add_argument("--max-body-bytes", type=_arg(_size), default=16 << 20, metavar="SIZE")
    p.add_argument(
        "--max-request-headers",
        type=int,
        default=MAX_REQUEST_HEADERS,
        metavar="N",
        help="the proxy's request header-count limit (Envoy max_headers_count, default 100); a request whose "
        "headers plus epp's own would exceed it gets 431",
    )
    p.add_argument("--max-fallback-endpoints", type=int, default=2)
    p.add_argument("--drain-timeout", type=_arg(parse_duration), default=30.0, metavar="DURATION")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    _flag(
        p,
        "--conformance-test-hooks",
        "GIE conformance: pick only among test-epp-endpoint-selection, echo x-conformance-test-served-endpoint",
    )
    p.add_argument(
        "--kv-events-port",
        type=int,
        default=0,
        metavar="PORT",
        help="subscribe to each pod's vLLM KV-cache events on this port (ZMQ; 0 = off); use with epp-precise",
    )
    p.add_argument(
        "--kv-events-topic-template",
        default="kv@{address}@",
        help="topic prefix per pod ({address} = ip:port of the pod's endpoint)",
    )
    p.add_argument(
        "--kv-events-bind",
        default="",
        metavar="tcp://IP:PORT",
        help="bind one ZMQ SUB socket that pods connect their KV-event publishers to (llm-d-inference-sim's "
        "--zmq-endpoint, vLLM's endpoint with a host); topics kv@<pod ip[:port]>@<model>; instead of --kv-events-port",
    )
    p.add_argument(
        "--peer-bind",
        default="",
        metavar="tcp://IP:PORT",
        help="active-active replicas: publish this replica's in-flight load and speculative prefix picks here",
    )
    p.add_argument(
        "--peers",
        type=lambda text: tuple(x.strip() for x in text.split(",") if x.strip()),
        default=(),
        metavar="HOST:PORT,...",
        help="the other replicas' --peer-bind addresses (a headless Service name resolves to every replica; "
        "a replica ignores its own messages)",
    )
    _flag(
        p,
        "--trust-model-rewrite-header",
        "honour x-gateway-model-name-rewrite from the request (only if your gateway strips clients' copies)",
    )
    _flag(
        p,
        "--route-admin-paths",
        "route model servers' admin paths (/v1/load_lora_adapter, /metrics, ...) instead of answering 403",
    )


def _add_envoy_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("envoy-config", help="render an Envoy bootstrap YAML for a pool file")
    p.add_argument("--pool-file", required=True)
    p.add_argument("--listen-port", type=int, required=True)
    p.add_argument("--listen-address", default="127.0.0.1")
    p.add_argument("--admin-port", type=int, default=0)
    p.add_argument("--epp-address", required=True, help="host:port of epp's ext_proc server, or unix:///path/epp.sock")
    p.add_argument(
        "--wiring",
        choices=["epp", "envoy-ai-gateway"],
        default="epp",
        help="epp: this project's wiring (the flags below); envoy-ai-gateway: exactly what Envoy AI Gateway "
        "renders for an InferencePool (full duplex, ORIGINAL_DST, TLS to epp, no metadata)",
    )
    p.add_argument(
        "--body-mode",
        choices=["lean", "buffered", "full-duplex"],
        default=None,
        help="lean (default): whole request body, response headers only (3 messages a request); buffered: "
        "also every response chunk; full-duplex: bodies streamed both ways",
    )
    p.add_argument("--lb", choices=["original-dst", "override-host"], default=None, help="default override-host")
    p.add_argument("--epp-tls", action="store_true", help="connect to epp over TLS (no verification)")
    p.add_argument(
        "--mirror-lb",
        choices=["load-aware", "plain"],
        default=None,
        help="shadow cluster: epp's x-gateway-mirror-endpoint pick, or plain round-robin "
        "(default load-aware; plain with --wiring envoy-ai-gateway, as Envoy Gateway renders a mirror)",
    )
    p.add_argument(
        "--ext-proc-max-concurrent-streams",
        type=int,
        default=None,
        metavar="N",
        help="at most N ext_proc streams per HTTP/2 connection to epp (default: no limit, one connection per Envoy "
        "worker thread); Envoy opens more connections beyond N, which epp serve --workers needs to use every worker",
    )
    p.add_argument("--access-log", default=None, help="access log path (default stdout)")
    p.add_argument("-o", "--output", default="-", help="file to write (default stdout)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epp", description="Endpoint Picker for inference gateways")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_envoy_config(sub)
    p = sub.add_parser("check-config", help="validate a pool file")
    p.add_argument("--pool-file", required=True)
    p = sub.add_parser("demo", help="run the traffic-mirroring scenario locally (sim pods, epp, Envoy)")
    p.add_argument("--requests", type=int, default=30, help="burst size after the scenario's request")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--keep", action="store_true", help="keep logs and configs")
    p.add_argument(
        "--mirror",
        choices=["load-aware", "plain"],
        default="load-aware",
        help="how mirrored copies are balanced over the shadow pool",
    )
    p = sub.add_parser("mirror-report", help="primary vs shadow pool, side by side, from the pods' /metrics")
    p.add_argument("--primary", nargs="+", required=True, metavar="URL", help="primary pods, e.g. http://10.0.0.5:8000")
    p.add_argument("--shadow", nargs="+", required=True, metavar="URL")
    p.add_argument(
        "--interval",
        type=_arg(parse_duration),
        default=10.0,
        metavar="DURATION",
        help="measurement window (default 10s)",
    )
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    return parser


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ  # the one place epp reads its environment
    if args.ha_enable_leader_election and args.pool_file:
        raise ConfigError("--ha-enable-leader-election needs Kubernetes discovery (--pool-name)")
    if not 0 < args.lease_retry_period < args.lease_renew_deadline < args.lease_duration:
        raise ConfigError("leader election needs 0 < --lease-retry-period < --lease-renew-deadline < --lease-duration")
    return Settings(
        pool_file=args.pool_file,
        pool_name=args.pool_name or "",
        pool_namespace=args.pool_namespace or env.get("NAMESPACE") or "default",
        pool_group=args.pool_group,
        kubeconfig=args.kubeconfig or env.get("KUBECONFIG") or None,
        ha_enable_leader_election=args.ha_enable_leader_election,
        lease_duration=args.lease_duration,
        lease_renew_deadline=args.lease_renew_deadline,
        lease_retry_period=args.lease_retry_period,
        grpc_port=args.grpc_port,
        grpc_health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        grpc_address=args.grpc_address,
        bind_address=args.bind_address,
        secure_serving=args.secure_serving,
        cert_path=args.cert_path,
        config_file=args.config_file,
        scheduling_profile=args.scheduling_profile,
        refresh_metrics_interval=args.refresh_metrics_interval,
        metrics_staleness_threshold=args.metrics_staleness_threshold,
        pool_file_poll_interval=args.pool_file_poll_interval,
        max_body_bytes=args.max_body_bytes,
        max_request_headers=args.max_request_headers,
        max_fallback_endpoints=args.max_fallback_endpoints,
        drain_timeout=args.drain_timeout,
        log_level=args.log_level,
        log_format=args.log_format,
        conformance_test_hooks=args.conformance_test_hooks,
        trust_model_rewrite_header=args.trust_model_rewrite_header,
        kv_events_port=args.kv_events_port,
        kv_events_topic_template=args.kv_events_topic_template,
        kv_events_bind=args.kv_events_bind,
        peer_bind=args.peer_bind,
        peers=args.peers,
        route_admin_paths=args.route_admin_paths,
        workers=args.workers,
    )


def _serve(settings: Settings) -> int:
    import uvloop

    from epp.app import App
    from epp.observability.logging import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    if settings.workers != 1:
        from epp.workers import serve_workers

        return serve_workers(settings)  # the parent: validates, starts the workers, prints their ready line

    def ready(app: App) -> None:
        # the readiness contract: one JSON line on stdout once every port is bound and the pool known
        sys.stdout.write(json.dumps(app.ready_line()) + "\n")
        sys.stdout.flush()

    async def run() -> int:
        app = App(settings)  # a bad pool file, profile name or config file raises ConfigError: exit code 2
        return await app.serve_until_signal(ready)

    return uvloop.run(run())


def _envoy_config(args: argparse.Namespace) -> int:
    from epp.envoy.ai_gateway import render_ai_gateway_bootstrap
    from epp.envoy.config import dump_bootstrap, render_bootstrap

    pool_file = load_pool_file(args.pool_file)
    if args.wiring == "envoy-ai-gateway":
        fixed = [
            flag
            for flag, value in (
                ("--body-mode", args.body_mode),
                ("--lb", args.lb),
                ("--ext-proc-max-concurrent-streams", args.ext_proc_max_concurrent_streams),
            )
            if value is not None
        ]
        if fixed:
            raise ConfigError(f"{', '.join(fixed)}: fixed by --wiring envoy-ai-gateway (full duplex, ORIGINAL_DST)")
        if args.epp_address.startswith("unix:"):
            raise ConfigError("--wiring envoy-ai-gateway reaches epp over TCP with TLS, not a Unix socket")
        boot = render_ai_gateway_bootstrap(
            pool_file,
            listen_port=args.listen_port,
            listen_address=args.listen_address,
            admin_port=args.admin_port,
            epp_address=args.epp_address,
            access_log_path=args.access_log,
            mirror_lb=args.mirror_lb or "plain",
        )
    else:
        if args.body_mode == "full-duplex" and pool_file.pool.failure_mode is FailureMode.FAIL_OPEN:
            print(
                "epp: warning: failureMode FailOpen with --body-mode full-duplex: Envoy ignores fail-open once a "
                "request body has arrived, so with epp down every request with a body fails (500); "
                "use --body-mode lean or buffered with --lb override-host to fail open",
                file=sys.stderr,
            )
        boot = render_bootstrap(
            pool_file,
            listen_port=args.listen_port,
            listen_address=args.listen_address,
            admin_port=args.admin_port,
            epp_address=args.epp_address,
            body_mode=args.body_mode or "lean",
            lb=args.lb or "override-host",
            epp_tls=args.epp_tls,
            access_log_path=args.access_log,
            mirror_lb=args.mirror_lb or "load-aware",
            ext_proc_max_concurrent_streams=args.ext_proc_max_concurrent_streams,
        )
    text = dump_bootstrap(boot)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import uvloop

    from epp.demo import run_demo

    return uvloop.run(
        run_demo(requests=args.requests, concurrency=args.concurrency, keep=args.keep, mirror=args.mirror)
    )


def _mirror_report(args: argparse.Namespace) -> int:
    import uvloop

    from epp.mirror_report import render_table, run_report, to_json

    reports = uvloop.run(run_report(args.primary, args.shadow, args.interval))
    print(to_json(reports) if args.json else render_table(reports))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    grpcenv.apply()  # before anything below imports grpc
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(settings_from(args))
        if args.command == "envoy-config":
            return _envoy_config(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "mirror-report":
            return _mirror_report(args)
        pool = load_pool_file(args.pool_file)
        print(f"ok: pool {pool.pool.name} with {len(pool.pool.endpoints)} endpoints")
        return 0
    except ConfigError as exc:
        print(f"epp: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
