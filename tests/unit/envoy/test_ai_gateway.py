"""``epp.envoy.ai_gateway``: Envoy AI Gateway's wiring of one pool, field by field (real Envoy
runs it in tests/gateway/test_ai_gateway.py), and ``epp envoy-config --wiring``."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from epp.cli import main
from epp.config import PoolFile, parse_pool_file
from epp.envoy import render_ai_gateway_bootstrap
from epp.envoy.ai_gateway import EG_BUFFER_LIMIT, epp_cluster_name, filter_name, route_cluster_name

from support.envoy import ext_proc_config

POOL = """
pool:
  name: vllm-llama2-7b-pool
  namespace: prod
  failureMode: {mode}
  endpoints: ["10.0.0.1:8000", "10.0.0.2:8000"]
"""
MIRROR = """
mirror:
  name: shadow
  endpoints: ["10.0.1.1:8000", "10.0.1.2:8000"]
"""


def pool_file(mode: str = "FailClose", mirror: bool = False) -> PoolFile:
    return parse_pool_file(POOL.format(mode=mode) + (MIRROR if mirror else ""))


def render(**kw: Any) -> dict[str, Any]:
    pf = kw.pop("pool_file", None) or pool_file()
    return render_ai_gateway_bootstrap(pf, listen_port=8080, epp_address="127.0.0.1:9002", **kw)


def hcm(boot: dict[str, Any]) -> dict[str, Any]:
    (listener,) = boot["static_resources"]["listeners"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def clusters(boot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in boot["static_resources"]["clusters"]}


@pytest.mark.parametrize("mode", ["FailClose", "FailOpen"])
def test_the_ext_proc_filter_is_exactly_ai_gateways(mode):
    ext_proc, router = hcm(render(pool_file=pool_file(mode)))["http_filters"]
    assert ext_proc["name"] == "envoy.filters.http.ext_proc/endpointpicker/vllm-llama2-7b-pool_prod_ext_proc"
    assert router["name"] == "envoy.filters.http.router"
    assert ext_proc["typed_config"] == {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {
            "cluster_name": "envoy.clusters.endpointpicker_vllm-llama2-7b-pool_prod_ext_proc",
            "authority": "vllm-llama2-7b-pool-epp.prod.svc:9002",
        }},
        "processing_mode": {
            "request_header_mode": "SEND", "request_body_mode": "FULL_DUPLEX_STREAMED", "request_trailer_mode": "SEND",
            "response_header_mode": "SEND", "response_body_mode": "FULL_DUPLEX_STREAMED",
            "response_trailer_mode": "SEND",
        },
        "allow_mode_override": False,
        "message_timeout": "300s",
        "failure_mode_allow": False,  # whatever the pool says
    }  # and so no metadata_options: no envoy.lb either way


def test_the_epp_cluster_is_http2_over_tls_without_verification():
    cluster = clusters(render())[epp_cluster_name("vllm-llama2-7b-pool", "prod")]
    assert (cluster["type"], cluster["lb_policy"], cluster["connect_timeout"]) == ("STRICT_DNS", "LEAST_REQUEST", "10s")
    tls = cluster["transport_socket"]["typed_config"]
    assert tls == {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {"validation_context": {}},
    }  # no SNI, no ALPN, any certificate
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    (lb,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert lb["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9002}


def test_the_pool_cluster_is_original_dst_on_the_destination_header():
    name = route_cluster_name("prod", "vllm-llama2-7b-pool")
    cluster = clusters(render())[name]
    assert cluster == {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": "x-gateway-destination-endpoint"},
        "per_connection_buffer_limit_bytes": EG_BUFFER_LIMIT,
    }  # no endpoints: nothing to fall back to
    (route,) = hcm(render())["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["cluster"] == name and route["route"]["auto_host_rewrite"] is False


def test_envoy_gateways_defaults_around_it():
    boot = render()
    (listener,) = boot["static_resources"]["listeners"]
    assert listener["per_connection_buffer_limit_bytes"] == EG_BUFFER_LIMIT == 32768
    assert all(c["per_connection_buffer_limit_bytes"] == EG_BUFFER_LIMIT for c in clusters(boot).values())


@pytest.mark.parametrize(("mirror_lb", "policy"), [("plain", None), ("load-aware", "override_host")])
def test_a_mirror_is_rendered_as_envoy_gateway_does(mirror_lb, policy):
    boot = render(pool_file=pool_file(mirror=True), mirror_lb=mirror_lb)
    (route,) = hcm(boot)["route_config"]["virtual_hosts"][0]["routes"]
    (mirror,) = route["route"]["request_mirror_policies"]
    name = route_cluster_name("prod", "vllm-llama2-7b-pool") + "-mirror-0"
    assert mirror == {"cluster": name, "runtime_fraction": {"default_value": {"numerator": 100,
                                                                                "denominator": "HUNDRED"}},
                      "disable_shadow_host_suffix_append": True}  # fmt: skip
    cluster = clusters(boot)[name]
    if policy is None:
        assert cluster["lb_policy"] == "LEAST_REQUEST"
    else:
        sources = cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"]["typed_config"]
        assert sources["override_host_sources"] == [{"header": "x-gateway-mirror-endpoint"}]


def test_the_epp_service_name_is_the_authority():
    ext_proc = hcm(render(epp_service="my-epp"))["http_filters"][0]
    assert ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["authority"] == "my-epp.prod.svc:9002"
    assert filter_name("p", "ns") == "envoy.filters.http.ext_proc/endpointpicker/p_ns_ext_proc"


# ---- the command line ----------------------------------------------------------------------


@pytest.fixture
def pool_path(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text(POOL.format(mode="FailOpen"))
    return path


def test_envoy_config_renders_the_ai_gateway_wiring(pool_path, capsys):
    args = ["envoy-config", "--pool-file", str(pool_path), "--listen-port", "8080", "--epp-address", "127.0.0.1:9002"]
    assert main([*args, "--wiring", "envoy-ai-gateway"]) == 0
    boot = yaml.safe_load(capsys.readouterr().out)
    assert boot == render(pool_file=parse_pool_file(pool_path.read_text()))
    assert main(args) == 0  # the default wiring is epp's own
    assert "metadata_options" in ext_proc_config(yaml.safe_load(capsys.readouterr().out))


BAD = [
    (["--body-mode", "buffered"], "--body-mode: fixed by --wiring envoy-ai-gateway"),
    (["--lb", "override-host"], "--lb: fixed by --wiring envoy-ai-gateway"),
    (["--epp-address", "unix:///tmp/epp.sock"], "not a Unix socket"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=["body-mode", "lb", "unix"])
def test_flags_the_wiring_fixes_are_refused(pool_path, capsys, extra, message):
    args = ["envoy-config", "--pool-file", str(pool_path), "--listen-port", "8080", "--epp-address", "127.0.0.1:9002",
            "--wiring", "envoy-ai-gateway", *extra]  # fmt: skip
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err
