"""Render the Envoy configuration Envoy AI Gateway gives an InferencePool, for one pool.

``epp envoy-config --wiring envoy-ai-gateway``: what Envoy runs when Envoy Gateway hands
an InferencePool backendRef to Envoy AI Gateway's extension server (AIGW v0.4 to v1.1,
``internal/extensionserver``; the facts are in ``docs/envoy-wiring.md`` and
``../shared/reference/gateways-2026.md``), so epp can be tested against that shape
without a cluster:

* the ext_proc filter ``envoy.filters.http.ext_proc/endpointpicker/<pool>_<ns>_ext_proc``:
  request and response bodies FULL_DUPLEX_STREAMED, every header and trailer mode SEND,
  ``message_timeout`` 300 s, ``failure_mode_allow`` false whatever the pool's failure
  mode says, ``allow_mode_override`` false and **no** ``metadata_options``: Envoy drops
  every ``envoy.lb`` key epp returns and forwards none to it;
* the pool's cluster (Envoy Gateway's route-rule cluster, rewritten by the hook):
  ``ORIGINAL_DST`` on the ``x-gateway-destination-endpoint`` header, one ``ip:port``, no
  endpoint list and so no fallback; ``connect_timeout`` 10 s;
* the EPP cluster ``envoy.clusters.endpointpicker_<pool>_<ns>_ext_proc``: STRICT_DNS,
  LEAST_REQUEST, HTTP/2, ``connect_timeout`` 10 s, and TLS with an empty validation
  context (any certificate accepted, no SNI); the gRPC ``authority`` is the EPP
  Service's cluster name ``<svc>.<ns>.svc:<port>``, not the address dialled;
* Envoy Gateway's defaults around it: 32 KiB per-connection buffer limits on the
  listener and every cluster, and a RequestMirror as EG renders one (its own cluster,
  ``disable_shadow_host_suffix_append``, EG's LEAST_REQUEST balancing), left alone by the
  hooks.

What epp loses there (README, "Envoy Gateway"): fallback endpoints, the subset hint and
the served-endpoint feedback all travel as metadata; only the destination header counts.
"""

from __future__ import annotations

from typing import Any

from epp.config import PoolFile
from epp.envoy import config as base
from epp.wire import DESTINATION_HEADER

WIRING = "envoy-ai-gateway"
EG_BUFFER_LIMIT = 32768  # Envoy Gateway's default per-connection buffer limit (listeners and clusters)
_CONNECT_TIMEOUT = "10s"
_MESSAGE_TIMEOUT = "300s"
EPP_PORT_DEFAULT = 9002


def filter_name(pool: str, namespace: str) -> str:
    return f"envoy.filters.http.ext_proc/endpointpicker/{pool}_{namespace}_ext_proc"


def epp_cluster_name(pool: str, namespace: str) -> str:
    return f"envoy.clusters.endpointpicker_{pool}_{namespace}_ext_proc"


def route_cluster_name(namespace: str, route: str, rule: int = 0) -> str:
    """Envoy Gateway's name for a route rule's cluster (and ``-mirror-<i>`` for a mirror)."""
    return f"httproute/{namespace}/{route}/rule/{rule}"


def render_ai_gateway_bootstrap(
    pool_file: PoolFile,
    *,
    listen_port: int,
    epp_address: str,
    listen_address: str = "127.0.0.1",
    admin_port: int = 0,
    access_log_path: str | None = None,
    route_timeout_s: float = 300,
    epp_service: str | None = None,
    mirror_lb: base.MirrorMode = "plain",
) -> dict[str, Any]:
    """Envoy AI Gateway's wiring of ``pool_file``'s pool, with epp at ``epp_address``.

    ``epp_service`` names the EPP Service in the gRPC authority (default ``<pool>-epp``).
    ``mirror_lb="load-aware"`` adds what ``manifests/scenario/overlays/load-aware-mirror``'s
    EnvoyPatchPolicy does to the mirror cluster; ``"plain"`` is Envoy Gateway's own.
    """
    pool = pool_file.pool
    ns = pool.namespace
    route = base.cluster_name(pool.name)
    pool_cluster = route_cluster_name(ns, route)
    epp_cluster = epp_cluster_name(pool.name, ns)
    _, epp_port = base.split_address(epp_address)
    authority = f"{epp_service or pool.name + '-epp'}.{ns}.svc:{epp_port or EPP_PORT_DEFAULT}"

    clusters: list[dict[str, Any]] = [_original_dst_cluster(pool_cluster)]
    mirror_cluster = None
    if pool_file.mirror is not None:
        mirror_cluster = f"{pool_cluster}-mirror-0"
        clusters.append(_mirror_cluster(pool_file, mirror_cluster, mirror_lb))
    clusters.append(_epp_cluster(epp_cluster, epp_address))

    route_action: dict[str, Any] = {
        "cluster": pool_cluster,
        "timeout": base._duration(route_timeout_s),
        "auto_host_rewrite": False,
    }
    if mirror_cluster is not None:
        route_action["request_mirror_policies"] = [
            {
                "cluster": mirror_cluster,
                "runtime_fraction": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                "disable_shadow_host_suffix_append": True,
            }
        ]
    hcm = {
        "@type": base._type("extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"),
        "stat_prefix": base.LISTENER_NAME,
        "access_log": [base._access_log(access_log_path or "/dev/stdout")],
        "route_config": {
            "name": f"{ns}/{route}",
            "virtual_hosts": [
                {
                    "name": f"{ns}/{route}/*",
                    "domains": ["*"],
                    "routes": [{"name": f"{pool_cluster}/match/0", "match": {"prefix": "/"}, "route": route_action}],
                }
            ],
        },
        "http_filters": [
            {"name": filter_name(pool.name, ns), "typed_config": _ext_proc(epp_cluster, authority)},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": base._type("extensions.filters.http.router.v3.Router")},
            },
        ],
    }
    listener = {
        "name": base.LISTENER_NAME,
        "address": base._socket_address(listen_address, listen_port),
        "enable_reuse_port": False,
        "per_connection_buffer_limit_bytes": EG_BUFFER_LIMIT,
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    return {
        "admin": {"address": base._socket_address("127.0.0.1", admin_port)},
        "static_resources": {"listeners": [listener], "clusters": clusters},
        "overload_manager": base._overload_manager(),
    }


def _ext_proc(epp_cluster: str, authority: str) -> dict[str, Any]:
    # Exactly the hook's fields; no metadata_options, no failure_mode_allow from the pool.
    return {
        "@type": base._type("extensions.filters.http.ext_proc.v3.ExternalProcessor"),
        "grpc_service": {"envoy_grpc": {"cluster_name": epp_cluster, "authority": authority}},
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND",
            "response_header_mode": "SEND",
            "response_body_mode": "FULL_DUPLEX_STREAMED",
            "response_trailer_mode": "SEND",
        },
        "allow_mode_override": False,
        "message_timeout": _MESSAGE_TIMEOUT,
        "failure_mode_allow": False,
    }


def _original_dst_cluster(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": _CONNECT_TIMEOUT,
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER},
        "per_connection_buffer_limit_bytes": EG_BUFFER_LIMIT,
    }


def _mirror_cluster(pool_file: PoolFile, name: str, mode: base.MirrorMode) -> dict[str, Any]:
    assert pool_file.mirror is not None
    cluster = base._shadow_cluster(pool_file.mirror, name, mode)
    cluster["connect_timeout"] = _CONNECT_TIMEOUT
    cluster["per_connection_buffer_limit_bytes"] = EG_BUFFER_LIMIT
    cluster.pop("circuit_breakers", None)  # Envoy's defaults, as EG leaves them
    if cluster.get("lb_policy") == "ROUND_ROBIN":
        cluster["lb_policy"] = "LEAST_REQUEST"  # EG's default for a Service backend
    return cluster


def _epp_cluster(name: str, epp_address: str) -> dict[str, Any]:
    host, port = base.split_address(epp_address)
    return {
        "name": name,
        "type": "STRICT_DNS",
        "lb_policy": "LEAST_REQUEST",
        "connect_timeout": _CONNECT_TIMEOUT,
        "per_connection_buffer_limit_bytes": EG_BUFFER_LIMIT,
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": base._type("extensions.transport_sockets.tls.v3.UpstreamTlsContext"),
                # "Ensure Envoy accepts untrusted certificates": an empty validation context, no SNI
                "common_tls_context": {"validation_context": {}},
            },
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": base._type("extensions.upstreams.http.v3.HttpProtocolOptions"),
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"health_status": "HEALTHY", "endpoint": {"address": base._socket_address(host, port)}}
                    ]
                }
            ],
        },
    }
