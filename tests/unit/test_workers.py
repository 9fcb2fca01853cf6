"""The ``--workers`` parent's pure parts: what it validates, each worker's settings."""

from __future__ import annotations

import pytest

from epp.config import Settings
from epp.errors import ConfigError
from epp.workers import check, expand_peers, worker_settings

IPC = ["ipc:///tmp/d/peer-0", "ipc:///tmp/d/peer-1", "ipc:///tmp/d/peer-2"]


def test_each_worker_shares_the_ports_and_gets_its_own_metrics_port_and_peer_endpoint() -> None:
    base = Settings(pool_file="pool.yaml", workers=3, metrics_port=9090)
    w = worker_settings(base, 2, 9002, 9003, IPC)
    assert (w.grpc_port, w.grpc_health_port, w.metrics_port, w.reuse_port) == (9002, 9003, 9092, True)
    assert w.worker_peer_bind == IPC[2] and w.worker_peers == (IPC[0], IPC[1])
    assert (w.peer_bind, w.peers) == ("", ())  # no --peer-bind: no pod-to-pod exchange
    assert worker_settings(Settings(metrics_port=0, workers=3), 1, 5, 6, IPC).metrics_port == 0  # port 0: each its own


@pytest.mark.parametrize(
    ("bind", "peers", "index", "expected"),
    [
        ("tcp://10.0.0.5:7000", ("epp-peers:7000",), 1, ("tcp://10.0.0.5:7001", ("epp-peers:7000", "epp-peers:7001"))),
        ("tcp://127.0.0.1:0", ("127.0.0.1:5555",), 1, ("tcp://127.0.0.1:0", ("127.0.0.1:5555", "127.0.0.1:5556"))),
        ("tcp://[fd00::1]:7000", (), 0, ("tcp://[fd00::1]:7000", ())),
        ("", ("ignored:1",), 0, ("", ())),
    ],
    ids=["fixed-port", "port-0", "ipv6", "off"],
)
def test_peer_bind_is_port_plus_index_and_each_peer_entry_covers_every_worker(
    bind: str, peers: tuple[str, ...], index: int, expected: tuple[str, tuple[str, ...]]
) -> None:
    assert expand_peers(bind, peers, index, 2) == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers": 0}, "at least 1"),
        ({"grpc_address": "unix:///tmp/epp.sock"}, "Unix socket"),
        ({"kv_events_bind": "tcp://127.0.0.1:0"}, "--kv-events-bind"),
        ({"ha_enable_leader_election": True, "pool_file": None, "pool_name": "p"}, "leader-election"),
        ({"scheduling_profile": "nope"}, "nope"),
        ({"pool_file": "/nonexistent/pool.yaml"}, "cannot read pool file"),
        ({"peers": ("a:1",)}, "--peers needs --peer-bind"),
        ({"peer_bind": "tcp://127.0.0.1:x"}, "expected tcp://IP:PORT"),
    ],
    ids=["zero", "unix", "kv-bind", "leader", "profile", "pool-file", "peers", "peer-bind"],
)
def test_what_the_parent_refuses_before_starting_a_worker(tmp_path, overrides, message) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text("pool:\n  name: p\n  endpoints: ['127.0.0.1:8000']\n")
    with pytest.raises(ConfigError, match=message):
        check(Settings(**{"pool_file": str(pool), "workers": 2, **overrides}))


def test_a_valid_setup_passes(tmp_path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text("pool:\n  name: p\n  endpoints: ['127.0.0.1:8000']\n")
    check(Settings(pool_file=str(pool), workers=4, peer_bind="tcp://127.0.0.1:0", peers=("127.0.0.1:7000",)))
