"""``epp envoy-config --epp-address unix:///…``: epp's cluster on a Unix socket (the sidecar
shape).  Belongs with tests/unit/envoy/test_config.py; kept apart while another change
owns that file."""

from __future__ import annotations

import pytest

from epp.config import parse_pool_file
from epp.envoy import render_bootstrap
from epp.envoy.config import unix_path
from epp.errors import ConfigError

POOL = parse_pool_file('pool: {name: p, endpoints: ["10.0.0.1:8000"]}')

PATHS = [
    ("absolute", "unix:///var/run/epp/epp.sock", "/var/run/epp/epp.sock"),
    ("relative", "unix:epp.sock", "epp.sock"),
    ("tcp", "127.0.0.1:9002", None),
]


@pytest.mark.parametrize(("address", "path"), [p[1:] for p in PATHS], ids=[p[0] for p in PATHS])
def test_unix_path(address, path):
    assert unix_path(address) == path


def test_an_empty_socket_path_is_refused():
    with pytest.raises(ConfigError, match="no socket path"):
        unix_path("unix://")


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_the_epp_cluster_dials_a_pipe(tls):
    boot = render_bootstrap(POOL, listen_port=8080, epp_address="unix:///run/epp.sock", epp_tls=tls)
    (epp,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == "epp"]
    assert epp["type"] == "STATIC"
    (lb,) = epp["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert lb["endpoint"]["address"] == {"pipe": {"path": "/run/epp.sock"}}
    if tls:
        assert "sni" not in epp["transport_socket"]["typed_config"]  # a path is no server name
    else:
        assert "transport_socket" not in epp
