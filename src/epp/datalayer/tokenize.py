"""The model server's own token ids, fetched over HTTP before a decision (vLLM's ``/tokenize``).

Used by the precise prefix scorer's ``tokenizer: vllm-tokenize``: before a request whose
prompt it has not seen is scheduled, the transport awaits :class:`TokenizeClient` for it,
which POSTs vLLM's tokenize request (``{"model", "prompt"}`` or ``{"model", "messages"}``,
see ``epp.scheduling.tokenizers.TokenizeNeed.body``) and hands the ``tokens`` of the answer
back to the tokenizer's cache.  The server is the job's URL, else a model server of the pool
that serves the job's model (``pick_server``), so nothing more than the pool itself needs
deploying.

Plain HTTP over epp's lean keep-alive client (``epp.datalayer.httpget``): in a cluster the
servers' API port is plain HTTP, as the scraper reads it.  Never raises and never waits past
the job's timeout: a failure (connection, status, a body
that is not vLLM's answer, ids outside uint32) or a timeout delivers nothing, and the
decision falls back on the approximate index for that request.  Each call is counted by
outcome (``ok``, ``timeout``, ``error``, ``no_server``, ``cancelled``) with its duration.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import urlsplit

import orjson

from epp.datalayer.httpget import HttpGetError, HttpGetter

__all__ = ["MAX_RESPONSE_BYTES", "TokenizeClient", "TokenizeJob"]

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 16 << 20  # a 1M-token prompt's ids as JSON fit with room to spare
_IDLE_PER_SERVER = 8  # kept-alive connections kept per server (more may be open at once)
_SERVERS = 256  # servers whose idle connections are kept (the pool's pods come and go)


class TokenizeJob(Protocol):
    """One call (``epp.scheduling.tokenizers.TokenizeNeed`` satisfies it)."""

    @property
    def url(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def timeout(self) -> float: ...
    def body(self) -> dict[str, object]: ...
    def deliver(self, token_ids: Sequence[int]) -> None: ...


class _BadAnswer(Exception):
    pass


def _token_ids(data: bytes) -> list[int]:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _BadAnswer(f"not JSON: {exc}") from None
    ids = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(ids, list):
        raise _BadAnswer("no 'tokens' list")
    try:  # every id an integer in uint32 (what the keys pack them as), checked in C
        struct.pack(f"<{len(ids)}I", *ids)
    except struct.error:
        raise _BadAnswer("'tokens' holds something other than uint32 ids") from None
    return ids


def _target(url: str) -> tuple[str, int, str]:
    """``http://host[:port][/prefix]`` → host, port, the ``/tokenize`` path under the prefix."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise _BadAnswer(f"not an http:// URL: {url!r}")
    return parts.hostname, parts.port or 80, parts.path.rstrip("/") + "/tokenize"


class TokenizeClient:
    """Awaitable per job (module docstring).  Kept-alive connections (``HttpGetter``, epp's lean
    HTTP/1.1 client) per server, idle ones reused; a call that fails or times out closes its own."""

    def __init__(
        self,
        pick_server: Callable[[str], str | None],
        *,
        observe: Callable[[str, float], None] | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._pick = pick_server
        self._observe = observe
        self._max = max_response_bytes
        self._idle: OrderedDict[str, list[HttpGetter]] = OrderedDict()
        self._closed = False

    async def __call__(self, job: TokenizeJob) -> None:
        started = time.perf_counter()
        outcome = "error"
        try:
            url = job.url
            if not url:
                address = None if self._closed else self._pick(job.model)
                if address is None:
                    outcome = "no_server"
                    return
                url = f"http://{address}"
            async with asyncio.timeout(job.timeout):
                ids = await self._fetch(url, orjson.dumps(job.body()))
            job.deliver(ids)
            outcome = "ok"
        except TimeoutError:
            outcome = "timeout"
        except asyncio.CancelledError:  # the request went away (its stream ended)
            outcome = "cancelled"
            raise
        except (HttpGetError, OSError, _BadAnswer, ValueError) as exc:  # ValueError: a bad port in a URL
            log.debug("tokenize failed: %s", exc)
        finally:
            if self._observe is not None:
                self._observe(outcome, time.perf_counter() - started)

    async def _fetch(self, url: str, body: bytes) -> list[int]:
        idle = self._idle.get(url)
        if idle:
            getter = idle.pop()
        else:
            host, port, path = _target(url)
            getter = HttpGetter(host, port, path, max_bytes=self._max)
        status, data = await getter.post(body)  # an exception or a cancellation closes its connection
        if self._closed:
            getter.close()
        else:
            self._release(url, getter)
        if status != 200:
            raise _BadAnswer(f"HTTP {status} from {url}")
        return _token_ids(data)

    def _release(self, url: str, getter: HttpGetter) -> None:
        idle = self._idle.get(url)
        if idle is None:
            idle = self._idle[url] = []
            while len(self._idle) > _SERVERS:
                for old in self._idle.popitem(last=False)[1]:
                    old.close()
        self._idle.move_to_end(url)
        if len(idle) < _IDLE_PER_SERVER:
            idle.append(getter)
        else:
            getter.close()

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for getter in idle:
                getter.close()
        self._idle.clear()
