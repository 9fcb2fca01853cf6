"""The model server's own token ids, fetched over HTTP before a decision (vLLM's ``/tokenize``).

Used by the precise prefix scorer's ``tokenizer: vllm-tokenize``: before a request whose
prompt it has not seen is scheduled, the transport awaits :class:`TokenizeClient` for it,
which POSTs vLLM's tokenize request (``{"model", "prompt"}`` or ``{"model", "messages"}``,
see ``epp.scheduling.tokenizers.TokenizeNeed.body``) and hands the ``tokens`` of the answer
back to the tokenizer's cache.  The server is the job's URL, else a routable model server of
the pool (``pick_server``), so nothing more than the pool itself needs deploying.

Never raises and never waits past the job's timeout: a failure (connection, status, a body
that is not vLLM's answer, ids outside uint32) or a timeout delivers nothing, and the
decision falls back on the approximate index for that request.  Each call is counted by
outcome (``ok``, ``timeout``, ``error``, ``no_server``) with its duration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import aiohttp
import orjson

__all__ = ["MAX_RESPONSE_BYTES", "TokenizeClient", "TokenizeJob"]

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 16 << 20  # a 1M-token prompt's ids as JSON fit with room to spare
_HEADERS = {"content-type": "application/json", "accept": "application/json"}
_UINT32 = 1 << 32


class TokenizeJob(Protocol):
    """One call (``epp.scheduling.tokenizers.TokenizeNeed`` satisfies it)."""

    @property
    def url(self) -> str: ...
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
    if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < _UINT32 for t in ids):
        raise _BadAnswer("no 'tokens' list of uint32 ids")
    return ids


class TokenizeClient:
    """Awaitable per job (module docstring); one keep-alive connection pool, opened on first use."""

    def __init__(
        self,
        pick_server: Callable[[], str | None],
        *,
        observe: Callable[[str, float], None] | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._pick = pick_server
        self._observe = observe
        self._max = max_response_bytes
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, job: TokenizeJob) -> None:
        started = time.perf_counter()
        outcome = "error"
        try:
            url = job.url
            if not url:
                address = self._pick()
                if address is None:
                    outcome = "no_server"
                    return
                url = f"http://{address}"
            async with asyncio.timeout(job.timeout):
                ids = await self._fetch(url + "/tokenize", orjson.dumps(job.body()))
            job.deliver(ids)
            outcome = "ok"
        except TimeoutError:
            outcome = "timeout"
        except (aiohttp.ClientError, OSError, _BadAnswer) as exc:
            log.debug("tokenize failed: %s", exc)
        finally:
            if self._observe is not None:
                self._observe(outcome, time.perf_counter() - started)

    async def _fetch(self, url: str, body: bytes) -> list[int]:
        session = self._session
        if session is None or session.closed:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64), raise_for_status=False, skip_auto_headers=("User-Agent",)
            )
        async with session.post(url, data=body, headers=_HEADERS) as resp:
            if resp.status != 200:
                raise _BadAnswer(f"HTTP {resp.status} from {url}")
            if resp.content_length is not None and resp.content_length > self._max:
                raise _BadAnswer(f"answer of {resp.content_length} bytes exceeds {self._max}")
            chunks, size = [], 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > self._max:
                    raise _BadAnswer(f"answer exceeds {self._max} bytes")
                chunks.append(chunk)
        return _token_ids(b"".join(chunks))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
