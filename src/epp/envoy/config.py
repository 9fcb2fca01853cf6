"""Render an Envoy 1.40 bootstrap that puts epp in front of one pool.

The result is a plain ``dict`` (``dump_bootstrap`` turns it into YAML) with:

* an admin listener on loopback, so ``/ready`` and ``/stats`` can be read;
* one HTTP listener whose filter chain is ``ext_proc`` (to epp) → ``router``;
* one route, ``/`` → the pool cluster, optionally mirrored to a shadow cluster;
* three clusters: the pool, the shadow (only with ``PoolFile.mirror``) and ``epp``.

Choices, each tested against Envoy 1.40 (the facts are in ``docs/envoy-wiring.md``):

* **Body modes.**  ``lean`` (the default) sends the whole request body in one message
  (BUFFERED) and only the response *headers*: three messages a request, and no response
  chunk crosses Python.  The request's end is the ext_proc stream's close, which Envoy 1.40
  sends when the HTTP stream ends (measured: ``tests/integration/test_lean_wiring.py``; the
  1.37 runtime guard ``ext_proc_stream_close_optimization`` is removed in 1.40, and setting
  it logs an envoy_bug).  epp asks for a response body only when it
  must restore a rewritten model name (``mode_override``).  Usage tokens are then not read.
  ``full-duplex`` streams the request body to epp (FULL_DUPLEX_STREAMED);
  Envoy then *requires* the trailer mode of that direction to be SEND, and arms no
  per-message timer.  ``buffered`` sends the whole request body in one message and
  streams the response (STREAMED) so SSE is not held back.  Its per-message timer
  defaults to 200 ms, far too tight for a scheduler, so ``message_timeout`` is always
  set to 300 s; the listener buffer is raised above ``max_body_bytes`` so Envoy does
  not answer 413 before epp sees the body.
* **How the pick reaches the upstream.**  ``override-host`` is a STATIC cluster of the
  pool's endpoints with the ``override_host`` LB policy: the endpoint comes from
  ``envoy.lb`` dynamic metadata, then from the ``x-gateway-destination-endpoint``
  header, and round-robin is the fallback (so fail-open still routes somewhere).  The
  host actually used is written back to ``envoy.lb`` under
  ``x-gateway-destination-endpoint-served`` and forwarded to epp with the response
  headers.  ``original-dst`` is what Envoy Gateway and GIE's test config use: any
  address in the header is dialled, with no endpoint list and no fallback.
* **Metadata.**  epp may write only ``envoy.lb`` (``receiving_namespaces``; without it
  Envoy silently drops the metadata).  epp receives ``envoy.lb`` and
  ``envoy.lb.subset_hint`` (``forwarding_namespaces``).
* **Circuit breakers.**  Envoy allows 1024 concurrent requests per cluster by default;
  every downstream request is also one ext_proc stream to ``epp``, so a load test
  would see overflow 503s long before epp or the model servers are the limit.
* **Graceful stream close** (runtime ``ext_proc_graceful_grpc_close``): Envoy half-closes each
  ext_proc stream and waits for epp's trailers instead of resetting it, which grpc.aio turns
  into a per-stream native memory leak.  epp reads a request's fate from what it saw, not
  from how the stream ended, so the lean wiring's end-of-request signal is unchanged.
* **No SO_REUSEPORT** on the listener, so a port clash fails at start instead of
  splitting traffic with another Envoy.
* **Connections to epp.**  Envoy multiplexes every ext_proc stream of a worker thread on one
  HTTP/2 connection (``max_concurrent_streams`` 2^31-1 by default).  ``epp serve --workers N``
  spreads load per *connection* (SO_REUSEPORT), so one connection keeps one worker busy and
  the others idle: ``ext_proc_max_concurrent_streams`` (``--ext-proc-max-concurrent-streams``)
  caps the streams per connection, and Envoy opens another connection beyond it.
* **TLS to epp** uses ALPN ``h2`` and no validation context, i.e. any certificate is
  accepted, as Envoy AI Gateway does.

Addresses are ``ip:port`` strings (IPv6 as ``[addr]:port``); epp's may also be a Unix
socket, ``unix:///path/epp.sock`` (``epp serve --grpc-address``, the sidecar shape).  Pool endpoints must be IP
literals with ``override-host``: a hostname would be resolved by Envoy and the picked
``host:port`` would never match, silently falling back to round-robin.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any, Literal

import yaml

from epp.config import PoolFile, PoolSpec
from epp.domain import FailureMode
from epp.errors import ConfigError
from epp.wire import (
    ADMIN_PATHS,
    DESTINATION_HEADER,
    LB_NAMESPACE,
    MAX_REQUEST_HEADERS,
    MIRROR_HEADER,
    MODEL_REWRITE_HEADER,
    SERVED_KEY,
    SUBSET_HINT_NAMESPACE,
)

BodyMode = Literal["lean", "buffered", "full-duplex"]
LbMode = Literal["original-dst", "override-host"]
MirrorMode = Literal["load-aware", "plain"]

EPP_CLUSTER = "epp"
LISTENER_NAME = "gateway"

_MIB = 1024 * 1024
_MESSAGE_TIMEOUT = "300s"
_GRPC_TIMEOUT = "10s"
_CONNECT_TIMEOUT = "5s"
_MAX_CONCURRENCY = 100_000
_MAX_DOWNSTREAM_CONNECTIONS = 50_000

_ACCESS_LOG_FORMAT = (
    "[%START_TIME%] %REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% "
    "%RESPONSE_CODE_DETAILS% %DURATION%ms rid=%REQ(X-REQUEST-ID)% cluster=%UPSTREAM_CLUSTER% "
    "host=%UPSTREAM_HOST% lbmd=%DYNAMIC_METADATA(envoy.lb)%\n"
)

_TYPE_PREFIX = "type.googleapis.com/envoy."
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def render_bootstrap(
    pool_file: PoolFile,
    *,
    listen_port: int,
    epp_address: str,
    listen_address: str = "127.0.0.1",
    body_mode: BodyMode = "lean",
    lb: LbMode = "override-host",
    epp_tls: bool = False,
    admin_port: int = 0,
    access_log_path: str | None = None,
    route_timeout_s: float = 300,
    max_body_bytes: int = 16 * _MIB,
    mirror_lb: MirrorMode = "load-aware",
    ext_proc_max_concurrent_streams: int | None = None,
) -> dict[str, Any]:
    """Build the bootstrap dict for one listener in front of ``pool_file``'s pool.

    ``admin_port=0`` binds any free port; start Envoy with ``--admin-address-path FILE``
    and read the bound ``ip:port`` from FILE (``EnvoyProcess`` does this).
    ``mirror_lb="load-aware"`` gives the shadow cluster an ``override_host`` policy on
    ``x-gateway-mirror-endpoint`` (set by epp when its pool file has a ``mirror``), with
    round-robin fallback; ``"plain"`` is round-robin only, like a plain Service.
    """
    pool = pool_file.pool
    pool_cluster = cluster_name(pool.name)
    shadow_cluster = cluster_name(pool_file.mirror.name) if pool_file.mirror is not None else None
    _check_distinct([pool_cluster, shadow_cluster, EPP_CLUSTER])

    clusters = [_pool_cluster(pool, pool_cluster, lb)]
    if pool_file.mirror is not None and shadow_cluster is not None:
        clusters.append(_shadow_cluster(pool_file.mirror, shadow_cluster, mirror_lb))
    clusters.append(_epp_cluster(epp_address, epp_tls, ext_proc_max_concurrent_streams))

    hcm = {
        "@type": _type("extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"),
        "stat_prefix": LISTENER_NAME,
        "access_log": [_access_log(access_log_path or "/dev/stdout")],
        "route_config": _route_config(
            pool_cluster, shadow_cluster, route_timeout_s, retry_fallbacks=lb == "override-host"
        ),
        # an incomplete request (headers or body that never finish) is dropped after a minute
        "request_headers_timeout": "10s",
        "request_timeout": "60s",
        "local_reply_config": _mark_envoy_client_errors(),
        # explicit, so the limit epp checks its header mutations against is visible here
        "common_http_protocol_options": {"max_headers_count": MAX_REQUEST_HEADERS},
        "http_filters": [
            _strip_control_headers(),
            _skip_on_envoy_client_errors(
                _ext_proc_filter(body_mode, fail_open=pool.failure_mode is FailureMode.FAIL_OPEN)
            ),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _type("extensions.filters.http.router.v3.Router")},
            },
        ],
    }
    listener: dict[str, Any] = {
        "name": LISTENER_NAME,
        "address": _socket_address(listen_address, listen_port),
        # Envoy defaults to SO_REUSEPORT, so a second Envoy (e.g. a stale one) would silently
        # share a fixed port and get part of the traffic; fail with "Address already in use".
        "enable_reuse_port": False,
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    if body_mode != "full-duplex":
        # The stream's decoder buffer limit comes from the listener; past it Envoy sends 413.
        listener["per_connection_buffer_limit_bytes"] = max_body_bytes + _MIB

    return {
        "admin": {"address": _socket_address("127.0.0.1", admin_port)},
        "static_resources": {"listeners": [listener], "clusters": clusters},
        "overload_manager": _overload_manager(),
        "layered_runtime": _runtime(),
    }


# Envoy ends every ext_proc stream with RST_STREAM by default (a half-close, then a reset).
# grpc.aio (grpcio 1.85) leaks the buffer of the read a reset fails, ~80-120 bytes of native
# memory per stream (grpc/grpc#43360; measured in tests/reliability/README.md).  Opting in to
# the graceful close (a half-close, then a wait of up to 1 s for the server's trailers) ends
# each stream cleanly instead.
GRACEFUL_CLOSE = "envoy.reloadable_features.ext_proc_graceful_grpc_close"


def _runtime() -> dict[str, Any]:
    # no admin layer: runtime stays read-only through the admin port, as without layered_runtime
    return {"layers": [{"name": "epp", "static_layer": {GRACEFUL_CLOSE: True}}]}


def dump_bootstrap(bootstrap: dict[str, Any]) -> str:
    """Serialise a bootstrap dict to YAML, keeping the rendered key order."""
    return yaml.safe_dump(bootstrap, sort_keys=False)


def cluster_name(pool_name: str) -> str:
    """The Envoy cluster name for a pool: its name with characters outside ``[A-Za-z0-9_.-]`` → ``_``."""
    return _UNSAFE_NAME_CHARS.sub("_", pool_name)


def split_address(address: str) -> tuple[str, int]:
    """Split ``ip:port`` / ``[v6]:port`` / ``host:port`` into host (no brackets) and port."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{address!r} is not host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_distinct(names: Sequence[str | None]) -> None:
    seen: set[str] = set()
    for name in names:
        if name is None:
            continue
        if name in seen:
            raise ConfigError(f"Envoy cluster name {name!r} is used twice (pool, mirror and {EPP_CLUSTER!r})")
        seen.add(name)


def _type(suffix: str) -> str:
    return _TYPE_PREFIX + suffix


def _duration(seconds: float) -> str:
    if seconds < 0:
        raise ConfigError(f"negative duration {seconds}")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.9f}".rstrip("0") + "s"


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _overload_manager() -> dict[str, Any]:
    # Without a downstream connection limit Envoy 1.40 logs a warning at every start.
    return {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": _type(
                        "extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
                    ),
                    "max_active_downstream_connections": _MAX_DOWNSTREAM_CONNECTIONS,
                },
            }
        ]
    }


def _access_log(path: str) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": _type("extensions.access_loggers.file.v3.FileAccessLog"),
            "path": path,
            "log_format": {"text_format_source": {"inline_string": _ACCESS_LOG_FORMAT}},
        },
    }


def _processing_mode(body_mode: BodyMode) -> dict[str, str]:
    if body_mode == "lean":
        # Three messages a request: headers, the whole body (epp routes on it), response
        # headers (status, the endpoint that served).  No response body crosses epp unless a
        # rewritten model name must be restored (epp asks for it with mode_override); the
        # request's end is the stream's close.
        return {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        }
    if body_mode == "full-duplex":
        # Envoy rejects FULL_DUPLEX_STREAMED unless that direction's trailers are sent too.
        return {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": "FULL_DUPLEX_STREAMED",
            "response_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND",
            "response_trailer_mode": "SEND",
        }
    return {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "response_body_mode": "STREAMED",  # SSE chunks reach the client as they come
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }


# Headers only epp (or the operator's gateway) may set: a client's own copies are removed
# before ext_proc, so with epp down and fail-open a client cannot pick the pod itself.
CLIENT_STRIPPED = (DESTINATION_HEADER, MIRROR_HEADER, MODEL_REWRITE_HEADER)


def _strip_control_headers() -> dict[str, Any]:
    return {
        "name": "strip-control-headers",
        "typed_config": {
            "@type": _type("extensions.filters.http.header_mutation.v3.HeaderMutation"),
            "mutations": {
                "request_mutations": [{"remove": name} for name in CLIENT_STRIPPED],
                # the marker below has done its job by the time the response gets here
                "response_mutations": [{"remove": ENVOY_REPLY_MARKER}],
            },
        },
    }


# Envoy's own replies to requests it could not parse (malformed HTTP 400, HTTP/1.0 426,
# oversized headers 431, unsupported transfer coding 501, and the slow-client 408 and
# buffer-overflow 413) are local replies that still pass through ext_proc's response path.
# For a codec error Envoy resets the stream right after, so while ext_proc waits for epp's
# answer to those response headers the reply is lost: the client gets 0 bytes (Envoy issue
# #29440, unfixed in 1.40).  The local-reply mapper marks these replies with a header and a
# matcher skips ext_proc for responses carrying it; nothing is lost for epp, which sees the
# stream close (and releases any claim) either way.
ENVOY_REPLY_MARKER = "x-epp-envoy-local-reply"
_ENVOY_CLIENT_ERRORS = (400, 408, 413, 426, 431, 501)


def _mark_envoy_client_errors() -> dict[str, Any]:
    def status_is(code: int) -> dict[str, Any]:
        value = {"default_value": code, "runtime_key": f"epp.local_reply.status_{code}"}
        return {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}

    return {
        "mappers": [
            {
                "filter": {"or_filter": {"filters": [status_is(code) for code in _ENVOY_CLIENT_ERRORS]}},
                "headers_to_add": [
                    {
                        "header": {"key": ENVOY_REPLY_MARKER, "value": "1"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
            }
        ]
    }


def _skip_on_envoy_client_errors(ext_proc: dict[str, Any]) -> dict[str, Any]:
    marked = {
        "input": {
            "name": "response-marker",
            "typed_config": {
                "@type": _type("type.matcher.v3.HttpResponseHeaderMatchInput"),
                "header_name": ENVOY_REPLY_MARKER,
            },
        },
        "value_match": {"exact": "1"},
    }
    skip = {"name": "skip", "typed_config": {"@type": _type("extensions.filters.common.matcher.action.v3.SkipFilter")}}
    return {
        "name": ext_proc["name"],
        "typed_config": {
            "@type": _type("extensions.common.matching.v3.ExtensionWithMatcher"),
            "extension_config": ext_proc,
            "xds_matcher": {
                "matcher_list": {
                    "matchers": [{"predicate": {"single_predicate": marked}, "on_match": {"action": skip}}]
                }
            },
        },
    }


def _ext_proc_filter(body_mode: BodyMode, *, fail_open: bool) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": _type("extensions.filters.http.ext_proc.v3.ExternalProcessor"),
            "grpc_service": {"envoy_grpc": {"cluster_name": EPP_CLUSTER}, "timeout": _GRPC_TIMEOUT},
            # Only honoured before body data arrives in FULL_DUPLEX_STREAMED (ext_proc.cc).
            "failure_mode_allow": fail_open,
            # Not armed in FULL_DUPLEX_STREAMED; in BUFFERED it replaces the 200 ms default.
            "message_timeout": _MESSAGE_TIMEOUT,
            "processing_mode": _processing_mode(body_mode),
            # lean: epp may ask for a response body (to restore a rewritten model name)
            "allow_mode_override": body_mode == "lean",
            "metadata_options": {
                "forwarding_namespaces": {"untyped": [LB_NAMESPACE, SUBSET_HINT_NAMESPACE]},
                "receiving_namespaces": {"untyped": [LB_NAMESPACE]},
            },
        },
    }


def _route_config(
    pool_cluster: str, shadow_cluster: str | None, timeout_s: float, *, retry_fallbacks: bool = False
) -> dict[str, Any]:
    # idle_timeout: a pod that stops sending bytes (hung) frees its requests after 2 minutes,
    # not at the 300 s route timeout; long generations that keep streaming are unaffected.
    route: dict[str, Any] = {"cluster": pool_cluster, "timeout": _duration(timeout_s), "idle_timeout": "120s"}
    if retry_fallbacks:
        # With override_host, a retry takes the next address of epp's list (its fallbacks):
        # a pod that died since epp's last scrape costs one refused connect, not a 503.
        route["retry_policy"] = {"retry_on": "connect-failure,refused-stream", "num_retries": 2}
    if shadow_cluster is not None:
        route["request_mirror_policies"] = [
            {
                "cluster": shadow_cluster,
                "runtime_fraction": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            }
        ]
    # model servers' admin paths never reach a pod, even with epp down (epp answers them 403 too)
    blocked = [{"match": {"path_separated_prefix": path}, "direct_response": _ADMIN_FORBIDDEN} for path in ADMIN_PATHS]
    return {
        "name": "local",
        "virtual_hosts": [
            {"name": "all", "domains": ["*"], "routes": [*blocked, {"match": {"prefix": "/"}, "route": route}]}
        ],
    }


_ADMIN_FORBIDDEN = {
    "status": 403,
    "body": {
        "inline_string": '{"error": {"message": "a model server admin path, not routed through the gateway", '
        '"type": "permission_denied", "code": 403}}'
    },
}


def _circuit_breakers() -> dict[str, Any]:
    limit = _MAX_CONCURRENCY
    return {"thresholds": [{"max_connections": limit, "max_pending_requests": limit, "max_requests": limit}]}


def _load_assignment(name: str, addresses: Sequence[str]) -> dict[str, Any]:
    lb_endpoints = []
    for address in addresses:
        host, port = split_address(address)
        lb_endpoints.append({"endpoint": {"address": _socket_address(host, port)}})
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]}


def _static_or_dns(addresses: Sequence[str]) -> str:
    return "STATIC" if all(_is_ip(split_address(a)[0]) for a in addresses) else "STRICT_DNS"


def _pool_cluster(pool: PoolSpec, name: str, lb: LbMode) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "connect_timeout": _CONNECT_TIMEOUT,
        "circuit_breakers": _circuit_breakers(),
    }
    if lb == "original-dst":
        return base | {
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER},
        }
    addresses = [e.address for e in pool.endpoint_list()]
    for address in addresses:
        if not _is_ip(split_address(address)[0]):
            raise ConfigError(f"pool {pool.name}: endpoint {address} is not ip:port; override-host needs IP addresses")
    return base | {
        "type": "STATIC",
        "load_balancing_policy": _override_host_policy(),
        "load_assignment": _load_assignment(name, addresses),
    }


def _override_host_policy(sources: Sequence[dict[str, Any]] | None = None, served_key: bool = True) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "policies": [
            {
                "typed_extension_config": {
                    "name": "envoy.load_balancing_policies.override_host",
                    "typed_config": {
                        "@type": _type("extensions.load_balancing_policies.override_host.v3.OverrideHost"),
                        "override_host_sources": list(sources)
                        if sources is not None
                        else [
                            {"metadata": {"key": LB_NAMESPACE, "path": [{"key": DESTINATION_HEADER}]}},
                            {"header": DESTINATION_HEADER},
                        ],
                        # Not in xds-protos 1.85's descriptor, but Envoy 1.40 accepts and applies it.
                        "selected_host_key": {"key": LB_NAMESPACE, "path": [{"key": SERVED_KEY}]},
                        "fallback_policy": {
                            "policies": [
                                {
                                    "typed_extension_config": {
                                        "name": "envoy.load_balancing_policies.round_robin",
                                        "typed_config": {
                                            "@type": _type(
                                                "extensions.load_balancing_policies.round_robin.v3.RoundRobin"
                                            )
                                        },
                                    }
                                }
                            ]
                        },
                    },
                }
            }
        ]
    }
    if not served_key:
        del policy["policies"][0]["typed_extension_config"]["typed_config"]["selected_host_key"]
    return policy


def _shadow_cluster(mirror: PoolSpec, name: str, mode: MirrorMode) -> dict[str, Any]:
    addresses = [e.address for e in mirror.endpoint_list()]
    cluster: dict[str, Any] = {
        "name": name,
        "type": _static_or_dns(addresses),
        "connect_timeout": _CONNECT_TIMEOUT,
        "circuit_breakers": _circuit_breakers(),
        "load_assignment": _load_assignment(name, addresses),
    }
    if mode == "load-aware" and cluster["type"] == "STATIC":
        # Mirrored requests carry the headers as epp mutated them: the shadow's pick is in
        # x-gateway-mirror-endpoint.  They also carry the primary's x-gateway-destination-endpoint,
        # which this cluster must not read, so the only source is the mirror header.
        cluster["load_balancing_policy"] = _override_host_policy([{"header": MIRROR_HEADER}], served_key=False)
    else:
        cluster["lb_policy"] = "ROUND_ROBIN"
    return cluster


def unix_path(address: str) -> str | None:
    """The socket file of a ``unix:`` address (``unix:///abs`` or ``unix:rel``), else None."""
    if not address.startswith("unix:"):
        return None
    rest = address.removeprefix("unix:")
    path = rest[2:] if rest.startswith("//") else rest
    if not path:
        raise ConfigError(f"{address!r}: no socket path")
    return path


def _epp_cluster(epp_address: str, tls: bool, max_concurrent_streams: int | None = None) -> dict[str, Any]:
    if max_concurrent_streams is not None and max_concurrent_streams < 1:
        raise ConfigError(f"ext_proc max_concurrent_streams {max_concurrent_streams}: needs at least 1")
    http2: dict[str, Any] = {} if max_concurrent_streams is None else {"max_concurrent_streams": max_concurrent_streams}
    socket_path = unix_path(epp_address)
    host = "" if socket_path is not None else split_address(epp_address)[0]
    cluster: dict[str, Any] = {
        "name": EPP_CLUSTER,
        "type": "STATIC" if socket_path is not None else _static_or_dns([epp_address]),
        "connect_timeout": _CONNECT_TIMEOUT,
        "circuit_breakers": _circuit_breakers(),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _type("extensions.upstreams.http.v3.HttpProtocolOptions"),
                "explicit_http_config": {"http2_protocol_options": http2},
            }
        },
        "load_assignment": _load_assignment(EPP_CLUSTER, [epp_address])
        if socket_path is None
        else {
            "cluster_name": EPP_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket_path}}}}]}],
        },
    }
    if tls:
        tls_context: dict[str, Any] = {
            "@type": _type("extensions.transport_sockets.tls.v3.UpstreamTlsContext"),
            # No validation_context: any server certificate is accepted.
            "common_tls_context": {"alpn_protocols": ["h2"]},
        }
        if host and not _is_ip(host):
            tls_context["sni"] = host
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls_context}
    return cluster
