"""The command line (``epp/cli.py``): flags, exit codes, and ``epp serve`` run in-process.

``main(["serve", ...])`` here runs in the test process, and ``_serve`` calls
``setup_logging``: the `epp` logger then writes to this test's captured stderr (closed
after the test) and stops propagating.  The autouse fixture in tests/conftest.py puts the
logger back; the last two tests check it.
"""

from __future__ import annotations

import logging
import sys

import pytest
import yaml

from epp.cli import build_parser, main, settings_from


def test_cli_bad_pool_file_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pool: {name: p, endpoints: ['x']}\n")
    assert main(["check-config", "--pool-file", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pool.endpoints" in err
    assert main(["serve", "--pool-file", str(tmp_path / "missing.yaml"), "--secure-serving=false"]) == 2


def test_cli_parses_reference_flag_spellings(tmp_path):
    args = build_parser().parse_args([
        "serve", "--pool-file", "p.yaml", "--grpc-port", "9102", "--secure-serving=false",
        "--refresh-metrics-interval", "100ms", "--metrics-staleness-threshold", "1m", "--max-body-bytes", "1Mi",
    ])
    s = settings_from(args)
    assert (s.grpc_port, s.secure_serving, s.refresh_metrics_interval) == (9102, False, 0.1)
    assert s.metrics_staleness_threshold == 60.0 and s.max_body_bytes == 1 << 20
    assert settings_from(build_parser().parse_args(["serve", "--pool-file", "p"])).secure_serving is True


def test_cli_bad_scheduling_config_exits_2_naming_the_plugin(tmp_path, capsys):
    pool = tmp_path / "pool.yaml"
    pool.write_text("pool: {name: p, endpoints: ['127.0.0.1:1']}\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("plugins: [{type: nope-scorer}]\n")
    assert main(["serve", "--pool-file", str(pool), "--config-file", str(cfg)]) == 2
    assert "unknown plugin type 'nope-scorer'" in capsys.readouterr().err
    assert main(["serve", "--pool-file", str(pool), "--scheduling-profile", "fancy"]) == 2
    assert "unknown scheduling profile 'fancy'" in capsys.readouterr().err


def test_serve_in_process_rewires_the_epp_logger(tmp_path, capsys):  # capsys: stderr is a test-owned stream
    """The hazard exists: an in-process ``epp serve`` points `epp` at this test's stderr."""
    logger = logging.getLogger("epp")
    before = list(logger.handlers)
    pool = tmp_path / "pool.yaml"
    pool.write_text("pool: {name: p, endpoints: ['127.0.0.1:1']}\n")
    assert main(["serve", "--pool-file", str(pool), "--scheduling-profile", "fancy"]) == 2
    assert logger.handlers != before and not logger.propagate
    (handler,) = logger.handlers
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr  # capsys's, closed after


def test_logging_works_after_an_in_process_serve(caplog, capsys):
    """Runs after the test above (file order): the `epp` logger is back and logging works."""
    logger = logging.getLogger("epp")
    assert logger.propagate and not any(
        isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False) for h in logger.handlers
    )
    with caplog.at_level(logging.INFO, logger="epp"):
        logging.getLogger("epp.regression").info("still logging")
    assert [r.getMessage() for r in caplog.records] == ["still logging"]
    assert "Logging error" not in capsys.readouterr().err  # what a closed stream gives


@pytest.mark.parametrize(("body_mode", "warned"), [(None, False), ("full-duplex", True), ("buffered", False)])
def test_envoy_config_warns_that_full_duplex_cannot_fail_open(tmp_path, capsys, body_mode, warned):
    from epp.cli import main

    pool = tmp_path / "pool.yaml"
    pool.write_text("pool: {name: p, failureMode: FailOpen, endpoints: ['127.0.0.1:18001']}\n")
    argv = ["envoy-config", "--pool-file", str(pool), "--listen-port", "10000", "--epp-address", "127.0.0.1:9002",
            "-o", str(tmp_path / "envoy.yaml")]
    assert main(argv + (["--body-mode", body_mode] if body_mode else [])) == 0
    err = capsys.readouterr().err
    assert ("ignores fail-open" in err) is warned
    rendered = yaml.safe_load((tmp_path / "envoy.yaml").read_text())
    mode = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (ext_proc,) = [f for f in mode["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    processing = ext_proc["typed_config"]["extension_config"]["typed_config"]["processing_mode"]
    assert (processing["response_body_mode"] == "NONE") is (body_mode is None)  # lean is the default
