"""Structure of the rendered Envoy bootstrap (the real binary checks it in tests/integration)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import yaml

from epp.config import PoolFile, parse_pool_file
from epp.envoy import cluster_name, dump_bootstrap, render_bootstrap
from epp.envoy.config import GRACEFUL_CLOSE, BodyMode, LbMode
from epp.errors import ConfigError
from epp.wire import ADMIN_PATHS

POOL_YAML = """
pool:
  name: vllm/llama 3
  failureMode: {failure_mode}
  endpoints: ["10.0.0.1:8000", "[fd00::2]:8000"]
"""
MIRROR_YAML = """
mirror:
  name: shadow-pool
  endpoints: ["10.0.1.1:8000"]
"""

COMBOS = list(
    itertools.product(
        ("lean", "full-duplex", "buffered"), ("original-dst", "override-host"), (False, True), (False, True)
    )
)
COMBO_IDS = [f"{b}-{lb}-{'tls' if t else 'plain'}-{'mirror' if m else 'nomirror'}" for b, lb, t, m in COMBOS]


def pool_file(*, mirror: bool, failure_mode: str = "FailClose") -> PoolFile:
    text = POOL_YAML.format(failure_mode=failure_mode) + (MIRROR_YAML if mirror else "")
    return parse_pool_file(text)


def render(
    body_mode: BodyMode = "full-duplex",
    lb: LbMode = "override-host",
    tls: bool = False,
    mirror: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    return render_bootstrap(
        pool_file(mirror=mirror),
        listen_port=8080,
        epp_address="127.0.0.1:9002",
        body_mode=body_mode,
        lb=lb,
        epp_tls=tls,
        **kwargs,
    )


def listener(boot: dict[str, Any]) -> dict[str, Any]:
    listeners: list[dict[str, Any]] = boot["static_resources"]["listeners"]
    assert len(listeners) == 1
    return listeners[0]


def hcm(boot: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = listener(boot)["filter_chains"][0]["filters"][0]["typed_config"]
    return config


def ext_proc(boot: dict[str, Any]) -> dict[str, Any]:
    filters = hcm(boot)["http_filters"]
    names = [f["name"] for f in filters]
    assert names == ["strip-control-headers", "envoy.filters.http.ext_proc", "envoy.filters.http.router"]
    wrapper = filters[1]["typed_config"]  # Envoy's own client-error replies skip ext_proc
    assert wrapper["@type"].endswith("ExtensionWithMatcher")
    config: dict[str, Any] = wrapper["extension_config"]["typed_config"]
    return config


def route(boot: dict[str, Any]) -> dict[str, Any]:
    (vhost,) = hcm(boot)["route_config"]["virtual_hosts"]
    *blocked, last = vhost["routes"]
    assert all(b["direct_response"]["status"] == 403 for b in blocked) and len(blocked) == len(ADMIN_PATHS)
    assert last["match"] == {"prefix": "/"}
    r: dict[str, Any] = last["route"]
    return r


def clusters(boot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in boot["static_resources"]["clusters"]}


@pytest.mark.parametrize(("body_mode", "lb", "tls", "mirror"), COMBOS, ids=COMBO_IDS)
def test_every_combination(body_mode: BodyMode, lb: LbMode, tls: bool, mirror: bool) -> None:
    boot = render(body_mode, lb, tls, mirror)
    proc = ext_proc(boot)
    mode = proc["processing_mode"]
    assert mode["request_header_mode"] == "SEND"
    assert mode["response_header_mode"] == "SEND"
    assert proc["grpc_service"] == {"envoy_grpc": {"cluster_name": "epp"}, "timeout": "10s"}
    assert proc["message_timeout"] == "300s"
    assert proc["metadata_options"]["receiving_namespaces"] == {"untyped": ["envoy.lb"]}
    assert proc["metadata_options"]["forwarding_namespaces"] == {"untyped": ["envoy.lb", "envoy.lb.subset_hint"]}
    # ext_proc streams end with a half-close and epp's trailers, not a reset (see GRACEFUL_CLOSE)
    assert boot["layered_runtime"] == {"layers": [{"name": "epp", "static_layer": {GRACEFUL_CLOSE: True}}]}
    if body_mode == "full-duplex":
        assert mode["request_body_mode"] == mode["response_body_mode"] == "FULL_DUPLEX_STREAMED"
        assert mode["request_trailer_mode"] == mode["response_trailer_mode"] == "SEND"
        assert "per_connection_buffer_limit_bytes" not in listener(boot)
    elif body_mode == "lean":  # headers, whole body, response headers; the stream's close ends the request
        assert mode["request_body_mode"] == "BUFFERED" and mode["response_body_mode"] == "NONE"
        assert mode["request_trailer_mode"] == mode["response_trailer_mode"] == "SKIP"
        assert proc["allow_mode_override"] is True  # epp asks for a body only to restore a model name
        assert listener(boot)["per_connection_buffer_limit_bytes"] == 17 * 1024 * 1024
    else:
        assert proc["allow_mode_override"] is False
        assert mode["request_body_mode"] == "BUFFERED"
        assert mode["response_body_mode"] == "STREAMED"
        assert mode["request_trailer_mode"] == mode["response_trailer_mode"] == "SKIP"
        assert listener(boot)["per_connection_buffer_limit_bytes"] == 17 * 1024 * 1024

    by_name = clusters(boot)
    pool_name = "vllm_llama_3"
    expected = [pool_name, "shadow-pool", "epp"] if mirror else [pool_name, "epp"]
    assert list(by_name) == expected
    assert route(boot)["cluster"] == pool_name
    if mirror:
        assert route(boot)["request_mirror_policies"] == [
            {
                "cluster": "shadow-pool",
                "runtime_fraction": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            }
        ]
        shadow = by_name["shadow-pool"]
        assert shadow["type"] == "STATIC"
        # load-aware mirroring (the default): override_host on the mirror header only, never the
        # primary's destination header, which mirrored requests also carry; no served-host metadata
        policy = shadow["load_balancing_policy"]["policies"][0]["typed_extension_config"]["typed_config"]
        assert policy["override_host_sources"] == [{"header": "x-gateway-mirror-endpoint"}]
        assert "selected_host_key" not in policy and "lb_policy" not in shadow
        assert socket_addresses(shadow) == [("10.0.1.1", 8000)]
    else:
        assert "request_mirror_policies" not in route(boot)

    pool = by_name[pool_name]
    if lb == "original-dst":
        assert pool["type"] == "ORIGINAL_DST"
        assert pool["lb_policy"] == "CLUSTER_PROVIDED"
        assert pool["original_dst_lb_config"] == {
            "use_http_header": True,
            "http_header_name": "x-gateway-destination-endpoint",
        }
        assert "load_assignment" not in pool
    else:
        assert pool["type"] == "STATIC"
        assert socket_addresses(pool) == [("10.0.0.1", 8000), ("fd00::2", 8000)]

    epp = by_name["epp"]
    assert epp["type"] == "STATIC"
    assert socket_addresses(epp) == [("127.0.0.1", 9002)]
    http = epp["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert http["explicit_http_config"] == {"http2_protocol_options": {}}
    if tls:
        sock = epp["transport_socket"]
        assert sock["name"] == "envoy.transport_sockets.tls"
        assert sock["typed_config"]["common_tls_context"] == {"alpn_protocols": ["h2"]}
        assert "validation_context" not in str(sock)
    else:
        assert "transport_socket" not in epp

    # The dict is plain data: it survives a YAML round trip unchanged.
    assert yaml.safe_load(dump_bootstrap(boot)) == boot


def socket_addresses(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    out = []
    for group in cluster["load_assignment"]["endpoints"]:
        for lb_endpoint in group["lb_endpoints"]:
            sock = lb_endpoint["endpoint"]["address"]["socket_address"]
            out.append((sock["address"], sock["port_value"]))
    return out


def test_override_host_sources_metadata_then_header() -> None:
    policy = clusters(render(lb="override-host"))["vllm_llama_3"]["load_balancing_policy"]
    (entry,) = policy["policies"]
    ext = entry["typed_extension_config"]
    assert ext["name"] == "envoy.load_balancing_policies.override_host"
    config = ext["typed_config"]
    assert config["override_host_sources"] == [
        {"metadata": {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}},
        {"header": "x-gateway-destination-endpoint"},
    ]
    assert config["selected_host_key"] == {
        "key": "envoy.lb",
        "path": [{"key": "x-gateway-destination-endpoint-served"}],
    }
    (fallback,) = config["fallback_policy"]["policies"]
    assert fallback["typed_extension_config"]["name"] == "envoy.load_balancing_policies.round_robin"


@pytest.mark.parametrize(("failure_mode", "allow"), [("FailOpen", True), ("FailClose", False)])
def test_failure_mode_allow_follows_pool(failure_mode: str, allow: bool) -> None:
    boot = render_bootstrap(
        pool_file(mirror=False, failure_mode=failure_mode), listen_port=1, epp_address="127.0.0.1:9002"
    )
    assert ext_proc(boot)["failure_mode_allow"] is allow


def test_addresses_ports_and_paths() -> None:
    boot = render(
        body_mode="buffered",
        listen_address="::1",
        admin_port=9901,
        access_log_path="/tmp/access.log",
        route_timeout_s=1.5,
        max_body_bytes=1000,
    )
    assert boot["admin"]["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}
    assert listener(boot)["address"] == {"socket_address": {"address": "::1", "port_value": 8080}}
    assert listener(boot)["enable_reuse_port"] is False
    assert listener(boot)["per_connection_buffer_limit_bytes"] == 1000 + 1024 * 1024
    assert route(boot)["timeout"] == "1.5s"
    (access_log,) = hcm(boot)["access_log"]
    assert access_log["typed_config"]["path"] == "/tmp/access.log"
    fmt = access_log["typed_config"]["log_format"]["text_format_source"]["inline_string"]
    for field in (
        "%REQ(:METHOD)%",
        "%REQ(:PATH)%",
        "%RESPONSE_CODE%",
        "%RESPONSE_FLAGS%",
        "%RESPONSE_CODE_DETAILS%",
        "%UPSTREAM_CLUSTER%",
        "%UPSTREAM_HOST%",
        "%DYNAMIC_METADATA(envoy.lb)%",
    ):
        assert field in fmt


def test_defaults() -> None:
    boot = render()
    assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 0}
    assert hcm(boot)["access_log"][0]["typed_config"]["path"] == "/dev/stdout"
    assert route(boot)["timeout"] == "300s"


def test_epp_hostname_uses_dns_and_sni() -> None:
    boot = render_bootstrap(pool_file(mirror=False), listen_port=1, epp_address="epp.default.svc:9002", epp_tls=True)
    epp = clusters(boot)["epp"]
    assert epp["type"] == "STRICT_DNS"
    assert socket_addresses(epp) == [("epp.default.svc", 9002)]
    assert epp["transport_socket"]["typed_config"]["sni"] == "epp.default.svc"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("pool", "pool"), ("a/b c", "a_b_c"), ("ns.pool-1_x", "ns.pool-1_x"), ("ü:x", "__x")],
    ids=["plain", "slash-space", "allowed-punctuation", "unicode-colon"],
)
def test_cluster_name(name: str, expected: str) -> None:
    assert cluster_name(name) == expected


def test_override_host_rejects_hostname_endpoints() -> None:
    pf = parse_pool_file("pool: {name: p, endpoints: ['vllm.default.svc:8000']}")
    with pytest.raises(ConfigError, match="override-host needs IP"):
        render_bootstrap(pf, listen_port=1, epp_address="127.0.0.1:9002", lb="override-host")
    # ORIGINAL_DST never lists endpoints, so hostnames there are fine.
    render_bootstrap(pf, listen_port=1, epp_address="127.0.0.1:9002", lb="original-dst")


@pytest.mark.parametrize("mirror_name", ["p", "epp"], ids=["same-as-pool", "same-as-epp"])
def test_cluster_name_collision(mirror_name: str) -> None:
    pf = parse_pool_file(
        f"pool: {{name: p, endpoints: ['10.0.0.1:1']}}\nmirror: {{name: {mirror_name}, endpoints: ['10.0.0.2:1']}}"
    )
    with pytest.raises(ConfigError, match="used twice"):
        render_bootstrap(pf, listen_port=1, epp_address="127.0.0.1:9002")


def test_plain_mirror_is_round_robin() -> None:
    from epp.config import parse_pool_file

    pf = parse_pool_file("pool: {name: p, endpoints: ['10.0.0.1:1']}\nmirror: {name: s, endpoints: ['10.0.0.2:1']}")
    boot = render_bootstrap(pf, listen_port=1, epp_address="127.0.0.1:9002", mirror_lb="plain")
    shadow = next(c for c in boot["static_resources"]["clusters"] if c["name"] == "s")
    assert shadow["lb_policy"] == "ROUND_ROBIN" and "load_balancing_policy" not in shadow


@pytest.mark.parametrize(("lb", "retries"), [("override-host", True), ("original-dst", False)])
def test_incomplete_requests_and_hung_pods_time_out_and_dead_picks_are_retried(lb, retries):
    boot = render_bootstrap(pool_file(mirror=False), listen_port=1, epp_address="127.0.0.1:9002", lb=lb)
    assert (hcm(boot)["request_headers_timeout"], hcm(boot)["request_timeout"]) == ("10s", "60s")
    assert route(boot)["idle_timeout"] == "120s"
    # only override_host has a list to retry on; ORIGINAL_DST would dial the same dead address again
    assert ("retry_policy" in route(boot)) is retries
    if retries:
        assert route(boot)["retry_policy"]["retry_on"] == "connect-failure,refused-stream"


def test_envoys_own_client_error_replies_skip_ext_proc_and_the_marker_is_removed():
    boot = render_bootstrap(pool_file(mirror=False), listen_port=1, epp_address="127.0.0.1:9002")
    (mapper,) = hcm(boot)["local_reply_config"]["mappers"]
    filters = mapper["filter"]["or_filter"]["filters"]
    codes = {f["status_code_filter"]["comparison"]["value"]["default_value"] for f in filters}
    assert codes == {400, 408, 413, 426, 431, 501}
    (added,) = mapper["headers_to_add"]
    marker = added["header"]["key"]
    wrapper = hcm(boot)["http_filters"][1]["typed_config"]
    (matcher,) = wrapper["xds_matcher"]["matcher_list"]["matchers"]
    assert matcher["predicate"]["single_predicate"]["input"]["typed_config"]["header_name"] == marker
    assert matcher["on_match"]["action"]["typed_config"]["@type"].endswith("SkipFilter")
    strip = hcm(boot)["http_filters"][0]["typed_config"]["mutations"]["response_mutations"]
    assert strip == [{"remove": marker}]  # the client never sees it
    assert hcm(boot)["common_http_protocol_options"] == {"max_headers_count": 100}


def test_clients_copies_of_epps_control_headers_are_removed_before_ext_proc():
    boot = render_bootstrap(pool_file(mirror=True), listen_port=1, epp_address="127.0.0.1:9002")
    strip = hcm(boot)["http_filters"][0]["typed_config"]["mutations"]["request_mutations"]
    assert {m["remove"] for m in strip} == {
        "x-gateway-destination-endpoint", "x-gateway-mirror-endpoint", "x-gateway-model-name-rewrite"}


def test_ext_proc_max_concurrent_streams_caps_streams_per_connection_to_epp() -> None:
    """``epp serve --workers`` spreads connections, not streams: a cap makes Envoy open more."""

    def http2(**kw: Any) -> dict[str, Any]:
        boot = render_bootstrap(pool_file(mirror=False), listen_port=1, epp_address="127.0.0.1:9002", **kw)
        (epp,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == "epp"]
        opts = epp["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        return dict(opts["explicit_http_config"]["http2_protocol_options"])

    assert http2() == {}  # default: Envoy's (2^31-1 streams, one connection per worker thread)
    assert http2(ext_proc_max_concurrent_streams=8) == {"max_concurrent_streams": 8}
    with pytest.raises(ConfigError, match="at least 1"):
        http2(ext_proc_max_concurrent_streams=0)
