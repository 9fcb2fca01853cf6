"""The real ``envoy`` binary accepts every rendered bootstrap, and EnvoyProcess owns its child."""

from __future__ import annotations

import asyncio
import itertools
import os

import aiohttp
import pytest

from epp.config import parse_pool_file
from epp.envoy import EnvoyProcess, render_bootstrap, validate
from epp.envoy.config import BodyMode, LbMode
from epp.errors import ConfigError

from support.envoy import ext_proc_config

POOL = parse_pool_file(
    """
pool: {name: vllm/llama, failureMode: FailOpen, endpoints: ["127.0.0.1:8001", "[::1]:8002"]}
mirror: {name: shadow, endpoints: ["127.0.0.1:8003"]}
"""
)
NO_MIRROR = POOL.model_copy(update={"mirror": None})
COMBOS: list[tuple[BodyMode, LbMode, bool, bool]] = list(
    itertools.product(
        ("lean", "full-duplex", "buffered"), ("original-dst", "override-host"), (False, True), (False, True)
    )
)


async def test_envoy_accepts_every_combination() -> None:
    async def check(body_mode: BodyMode, lb: LbMode, tls: bool, mirror: bool) -> None:
        boot = render_bootstrap(
            POOL if mirror else NO_MIRROR,
            listen_port=0,
            epp_address="127.0.0.1:9002",
            body_mode=body_mode,
            lb=lb,
            epp_tls=tls,
        )
        try:
            await validate(boot)
        except ConfigError as exc:
            raise AssertionError(f"{body_mode} {lb} tls={tls} mirror={mirror}: {exc}") from exc

    await asyncio.gather(*(check(*combo) for combo in COMBOS))


async def test_validate_reports_envoys_message() -> None:
    boot = render_bootstrap(NO_MIRROR, listen_port=0, epp_address="127.0.0.1:9002", body_mode="full-duplex")
    ext_proc_config(boot)["processing_mode"]["request_trailer_mode"] = "SKIP"
    with pytest.raises(ConfigError, match="request_trailer_mode has to be set to SEND"):
        await validate(boot)


async def test_start_ready_and_aclose() -> None:
    boot = render_bootstrap(POOL, listen_port=0, epp_address="127.0.0.1:9002", body_mode="buffered")
    envoy = EnvoyProcess(boot)
    async with envoy:
        pid = envoy.pid
        assert pid is not None
        async with aiohttp.ClientSession() as session, session.get(f"{envoy.admin_url}/ready") as resp:
            assert resp.status == 200
        stats = await envoy.stats(r"^cluster\.shadow\.upstream_rq_total$|ext_proc\.streams_started")
        assert stats == {"cluster.shadow.upstream_rq_total": 0, "http.gateway.ext_proc.streams_started": 0}
        host, _, port = (await envoy.listener_address()).rpartition(":")
        assert host == "127.0.0.1"
        assert int(port) > 0
        workdir = envoy.workdir
    await envoy.aclose()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists()


async def test_start_failure_raises_with_stderr() -> None:
    boot = render_bootstrap(NO_MIRROR, listen_port=0, epp_address="127.0.0.1:9002")
    boot["static_resources"]["clusters"][0]["connect_timeout"] = "-1s"
    envoy = EnvoyProcess(boot)
    with pytest.raises(ConfigError, match="envoy exited with code"):
        await envoy.start()
    assert envoy.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(envoy.pid, 0)


async def test_listen_port_clash_fails_instead_of_sharing() -> None:
    first = EnvoyProcess(render_bootstrap(NO_MIRROR, listen_port=0, epp_address="127.0.0.1:9002"))
    async with first:
        port = int((await first.listener_address()).rpartition(":")[2])
        second = EnvoyProcess(render_bootstrap(NO_MIRROR, listen_port=port, epp_address="127.0.0.1:9002"))
        with pytest.raises(ConfigError, match="Address already in use"):
            await second.start()
