"""A long prompt through ``epp envoy-config``'s own wiring, in every body mode and cluster
kind (the other core cases run in tests/integration/test_gateway_envoy.py)."""

from __future__ import annotations

import orjson
import pytest

from .harness import BIG_PROMPT_CHARS, COMPLETION
from .scenario import start_epp_wiring

MODES = [("full-duplex", "override-host"), ("full-duplex", "original-dst"),
         ("buffered", "override-host"), ("buffered", "original-dst")]


@pytest.mark.parametrize(("body_mode", "lb"), MODES, ids=[f"{b}-{lb}" for b, lb in MODES])
async def test_a_200kb_prompt_reaches_the_picked_pod(stacks, body_mode, lb):
    gw = await start_epp_wiring(stacks, pods=await stacks.pods(2), body_mode=body_mode, lb=lb)
    prompt = "".join(chr(ord("a") + i % 26) for i in range(BIG_PROMPT_CHARS))
    status, headers, body = await gw.post({**COMPLETION, "prompt": prompt})
    assert status == 200, body[:300]
    pod = gw.by_name(headers["x-served-by"])
    (seen,) = pod.seen
    assert seen.headers["x-gateway-destination-endpoint"] == pod.address
    assert orjson.loads(seen.body)["prompt"] == prompt
    await gw.idle()
    assert gw.app.datastore.load.total_inflight() == 0
