"""``epp.discovery._kube.Reflector`` with a scripted API: how a listed optional collection rides
out the 403/404 answers of an API server that has just restarted (the real API server is in
tests/kubernetes/)."""

from __future__ import annotations

import json
from typing import Any

from epp.discovery._kube import Reflector, WatchTiming


class Answer:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.reason, self._body = status, "", json.dumps(body).encode()

    async def read(self) -> bytes:
        return self._body

    def release(self) -> None:
        return None


class ScriptedList:
    """The list call: answers the next status in ``script`` (200 lists one pool)."""

    def __init__(self, *script: int) -> None:
        self.script = list(script)

    async def __call__(self, **kwargs: Any) -> Answer:
        status = self.script.pop(0)
        if status == 200:
            return Answer(200, {"metadata": {"resourceVersion": "7"}, "items": [{"metadata": {"name": "pool"}}]})
        return Answer(status, {"kind": "Status", "message": "forbidden" if status == 403 else "not found"})


async def test_a_listed_collection_keeps_its_view_through_brief_403s_then_lets_go():
    now = [0.0]
    seen: list[set[str]] = []
    reflector = Reflector("inferencepools/pool", ScriptedList(200, 403, 404, 200, 403, 403), optional=True,
                          timing=WatchTiming(absent_grace=10.0), clock=lambda: now[0],
                          on_change=lambda: seen.append(set(reflector.items)))  # fmt: skip
    assert await reflector.try_list() and reflector.items.keys() == {"pool"}
    for t in (1.0, 9.0):  # 403 then 404 within the grace: the last view stands, a list comes next
        now[0] = t
        assert not await reflector.try_list()
        assert reflector.items.keys() == {"pool"} and reflector.available and reflector.resource_version is None
    now[0] = 9.5
    assert await reflector.try_list()  # the API server is back: the grace starts over
    now[0] = 20.0
    assert not await reflector.try_list() and reflector.available  # refused again: a new grace
    now[0] = 30.0
    assert not await reflector.try_list()  # refused for the whole grace: gone
    assert reflector.available is False and reflector.items == {}
    assert seen == [{"pool"}, {"pool"}, set()]  # consumers never saw the view drop inside a grace


async def test_a_collection_never_listed_is_absent_at_once():
    reflector = Reflector("inferencemodels", ScriptedList(404), optional=True, timing=WatchTiming(),
                          clock=lambda: 0.0, on_change=lambda: None)  # fmt: skip
    assert not await reflector.try_list()
    assert reflector.available is False and reflector.synced
