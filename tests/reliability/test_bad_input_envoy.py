"""The bad-input matrix (``reliability.inputs``) through real Envoy, in each wiring epp
renders: lean (the default), full duplex and buffered.

One Gateway per body mode (real Envoy on the rendered bootstrap, in-process epp, two pool
pods that record what arrives, and a "rogue" HTTP server outside the pool that a client's
copy of ``x-gateway-destination-endpoint`` names).  Every row is sent and checked; the
broken rows are collected and reported together, so one run names every one of them.
After the table epp still serves, nothing is left in flight, metric labels stay bounded
and no log line epp wrote grows with the input.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from yarl import URL

from epp.observability.logging import setup_logging
from reliability.inputs import INPUTS, MAX_BODY, MAX_ERROR_BODY, MAX_HEADER_VALUE, ROGUE, BadInput

from support.gateway import Gateway
from support.upstreams import Upstream

GOOD = {"model": "m", "prompt": "Say hello", "max_tokens": 3}
MAX_LOG_LINE = 2048  # a request id is clipped to 256 chars, a message to ~512
MODEL_LABEL_VALUES = {"", "m", "m-target", "other"}  # the allowlist's names, else "other"


async def _chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


async def send(gw: Gateway, row: BadInput, rogue: Upstream) -> tuple[int, dict[str, str], bytes]:
    """One row as a client sends it: exact path, its headers, content-length or chunked."""
    headers = {k: v.replace(ROGUE, rogue.address) for k, v in row.headers.items() if k.lower() != "content-type"}
    if row.content_type:
        headers["content-type"] = row.content_type
    data: Any = None
    if row.body is not None:
        # (a file-like body: aiohttp warns that large raw bytes may block its loop; it still sends content-length)
        data = _chunks(row.body) if row.chunked else io.BytesIO(row.body)
    url = URL(gw.url + row.path, encoded=True)  # as written: no re-encoding of the path or query
    async with gw.http.request(row.method, url, data=data, headers=headers, skip_auto_headers=("content-type",)) as r:
        return r.status, dict(r.headers), await r.read()


def check_answer(row: BadInput, status: int, headers: dict[str, str], body: bytes) -> list[str]:
    problems = []
    if status != row.status:
        problems.append(f"status {status}, expected {row.status}: {body[:200]!r}")
    long = [k for k, v in headers.items() if len(v) > MAX_HEADER_VALUE]
    if long:
        problems.append(f"response headers {long} longer than {MAX_HEADER_VALUE}")
    if row.json_error and status == row.status:
        if len(body) > MAX_ERROR_BODY:
            problems.append(f"error body of {len(body)} bytes")
        try:
            err = orjson.loads(body)["error"]
            if err["code"] != status or not isinstance(err["message"], str) or not err["message"]:
                problems.append(f"error document {err!r}")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            problems.append(f"not an error document: {body[:200]!r}")
    return problems


def check_arrivals(row: BadInput, gw: Gateway, before: list[int]) -> list[str]:
    new = [(u, u.seen[n:]) for u, n in zip(gw.upstreams, before, strict=True)]
    arrived = [(u, s) for u, seen in new for s in seen]
    if not row.routed:
        return [f"reached {[u.name for u, _ in arrived]}"] if arrived else []
    if len(arrived) != 1:
        return [f"reached {len(arrived)} pods, expected one"]
    (pod, seen), problems = arrived[0], []
    if seen.headers.get("x-gateway-destination-endpoint") != pod.address:
        problems.append(f"{pod.name} got destination {seen.headers.get('x-gateway-destination-endpoint')!r}")
    if row.body:
        model = orjson.loads(seen.body).get("model")
        if model != "m-target":
            problems.append(f"pod got model {str(model)[:80]!r}, expected the allowlist's target m-target")
    if row.upstream_keeps and row.upstream_keeps not in seen.body:
        problems.append(f"pod's body lost {row.upstream_keeps!r}: {seen.body[:200]!r}")
    if row.upstream_lacks and (row.upstream_lacks in seen.body
                               or any(row.upstream_lacks.decode() in v for v in seen.headers.values())):
        problems.append(f"pod saw {row.upstream_lacks!r}")
    return problems


def samples(gw: Gateway, name: str) -> list[Any]:
    return [s for m in gw.app.metrics.registry.collect() for s in m.samples if s.name == name]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("body_mode", ["lean", "full-duplex", "buffered"])
async def test_every_bad_input_gets_its_answer_through_envoy(gateway, body_mode):
    setup_logging("info")  # epp's own handler and clipping filter, here writing to a buffer
    log = io.StringIO()
    logging.getLogger("epp").handlers[0].setStream(log)  # the StreamHandler setup_logging installed
    gw = await gateway(body_mode=body_mode, max_body_bytes=MAX_BODY)
    rogue = await Upstream("rogue").start()  # outside the pool: nothing may ever reach it
    try:
        assert INPUTS
        failures: list[str] = []
        for row in INPUTS:
            before = [len(u.seen) for u in gw.upstreams]
            try:
                async with asyncio.timeout(10):
                    status, headers, body = await send(gw, row, rogue)
            except Exception as exc:  # a broken row is reported with the others, not alone
                failures.append(f"{row.id}: {type(exc).__name__}: {exc}")
                continue
            problems = check_answer(row, status, headers, body) + check_arrivals(row, gw, before)
            failures += [f"{row.id} ({row.why}): {p}" for p in problems]
        if rogue.seen:
            failures.append(f"the rogue server got {[s.path for s in rogue.seen]}")

        # epp still serves, and nothing stays claimed
        status, _, body = await gw.post(GOOD)
        assert status == 200, body
        await asyncio.wait_for(gw.app.servicer.wait_idle(), 10)
        assert gw.app.datastore.load.total_inflight() == 0
        running = samples(gw, "inference_model_running_requests")
        assert running and sum(s.value for s in running) == 0
        assert gw.value("inference_model_request_total", {"model_name": "m", "target_model_name": "m-target"}) > 1

        # label values stay bounded whatever model names clients sent (the 1 MB one included)
        labels = {(k, v) for m in gw.app.metrics.registry.collect() for s in m.samples for k, v in s.labels.items()}
        assert labels and max(len(v) for _, v in labels) <= 256
        assert {v for k, v in labels if k in ("model_name", "target_model_name")} <= MODEL_LABEL_VALUES

        # epp's log lines: the 1 MB model name and the huge request id are clipped, no tracebacks
        lines = log.getvalue().splitlines()
        assert any("rejected 404" in line for line in lines)
        failures += [f"log line of {len(line)} chars: {line[:200]}" for line in lines if len(line) > MAX_LOG_LINE]
        failures += [f"epp logged: {line[:300]}" for line in lines if " ERROR " in line or "Error:" in line]
        assert failures == [], "\n".join(failures)
    finally:
        await rogue.aclose()
