"""Per-endpoint metric scrape loops.

One loop per endpoint (primary and mirror pool), each on its own cadence with jitter so
pods are not hit in lock-step, each bounded by a timeout, so one slow pod never stales
another.  A scrape asks only for the families the engine mapping needs
(``?name[]=…``, honoured by prometheus_client servers such as vLLM) over a kept-alive
connection (:mod:`epp.datalayer.httpget`) and reads at most ``max_bytes``.  Failures
of any kind (connection, HTTP status, timeout, oversize, garbage) are counted per pod
and leave the last metrics in place, where their age marks them stale; a refused
connection (nothing listens: the pod died) also marks the endpoint unreachable at once,
so it stops being picked within one scrape interval instead of the staleness
threshold.  Every ``models_interval`` seconds (and whenever an endpoint comes back) the
loop also reads ``/v1/models``, which lists the base model and the LoRA adapters loaded
there, so a request is never sent to a pod that cannot serve its model.  Membership
belongs to discovery: loops follow the datastore.  The loops run as supervised tasks
(:class:`epp.supervisor.Supervisor`): one that raises is logged, counted and restarted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import urlencode

import orjson

from epp.datalayer.datastore import Datastore
from epp.datalayer.engines import EngineMapping, engine_for
from epp.datalayer.exposition import ExpositionError, parse_metrics
from epp.datalayer.httpget import HttpGetError, HttpGetter
from epp.domain import Endpoint

log = logging.getLogger(__name__)

ErrorHook = Callable[[Endpoint, str], None]


class Task(Protocol):
    def cancel(self) -> None: ...


class Spawner(Protocol):
    """Runs a background loop under supervision (``epp.supervisor.Supervisor``)."""

    def spawn(self, name: str, run: Callable[[], Awaitable[None]]) -> Task: ...


class ScrapeFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class EndpointScraper:
    """Scrapes one endpoint; ``scrape_once`` is the unit tests drive directly."""

    def __init__(
        self,
        endpoint: Endpoint,
        mapping: EngineMapping,
        store: Datastore,
        *,
        timeout: float,
        max_bytes: int = 4 << 20,
        clock: Callable[[], float] = time.monotonic,
        on_error: ErrorHook | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.mapping = mapping
        self._store = store
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._clock = clock
        self._on_error = on_error
        query = urlencode([("name[]", n) for n in mapping.families()])
        host, _, port = endpoint.address.rpartition(":")
        self._getter = HttpGetter(host.strip("[]"), int(port), f"/metrics?{query}", max_bytes=max_bytes)
        self._models_getter = HttpGetter(host.strip("[]"), int(port), "/v1/models", max_bytes=1 << 20)
        self.errors = 0
        self.successes = 0
        self.recovered = False  # the last scrape was the first, or succeeded after a failed one
        self._failing = False

    async def fetch(self) -> str:
        try:
            async with asyncio.timeout(self._timeout):
                status, body = await self._getter.get()
        except TimeoutError:
            raise ScrapeFailed("timeout", f"no answer within {self._timeout:.3f}s") from None
        except HttpGetError as exc:
            raise ScrapeFailed(exc.reason, str(exc)) from None
        if status != 200:
            raise ScrapeFailed("http_status", f"HTTP {status}")
        return body.decode("utf-8", "replace")

    def close(self) -> None:
        self._getter.close()
        self._models_getter.close()

    async def models_once(self) -> bool:
        """Read ``/v1/models`` into the datastore; an endpoint without it is recorded as unknown."""
        try:
            async with asyncio.timeout(self._timeout):
                status, body = await self._models_getter.get()
        except (TimeoutError, HttpGetError):
            return False
        if status != 200:
            self._store.set_served_models(self.endpoint.address, None)
            return False
        models = _model_ids(body)
        self._store.set_served_models(self.endpoint.address, models)
        return models is not None

    async def scrape_once(self) -> bool:
        """Fetch and store one scrape; False (and the error counted) when it failed."""
        try:
            text = await self.fetch()
            metrics = parse_metrics(text, self.mapping, self._clock())
        except ScrapeFailed as exc:
            return self._failed(exc.reason, str(exc))
        except (ExpositionError, UnicodeError) as exc:
            return self._failed("parse", str(exc))
        self.recovered = self.successes == 0 or self._failing
        self._failing = False
        self._store.set_metrics(self.endpoint.address, metrics)
        self.successes += 1
        return True

    def _failed(self, reason: str, detail: str) -> bool:
        self.errors += 1
        self._failing = True
        if reason == "connection":  # nothing listens there: stop picking it now, not at staleness
            self._store.set_unreachable(self.endpoint.address, True)
        if self._on_error is not None:
            self._on_error(self.endpoint, reason)
        if self.errors == 1 or self.errors % 100 == 0:
            log.warning(
                "scrape of %s failed (%s): %s [%d failures]", self.endpoint.address, reason, detail, self.errors
            )
        return False


class ScrapeLoops:
    """One supervised scrape task per endpoint of either pool; follows datastore membership changes."""

    def __init__(
        self,
        store: Datastore,
        spawner: Spawner,
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        models_interval: float = 5.0,
        on_error: ErrorHook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._spawner = spawner
        self._interval = interval
        self._models_interval = models_interval
        self._timeout = timeout
        self._on_error = on_error
        self._rng = rng or random.Random()
        self._tasks: dict[str, tuple[Endpoint, Task]] = {}
        self._started = False
        self.scrapers: dict[str, EndpointScraper] = {}

    def start(self) -> None:
        self._started = True
        self._store.on_change(self.sync)
        self.sync()

    def sync(self) -> None:
        if not self._started:
            return
        store = self._store
        wanted = {e.address: e for e in store.all_endpoints()}
        for address in list(self._tasks):
            endpoint, task = self._tasks[address]
            if wanted.get(address) != endpoint:
                self._drop(address)
        for address, endpoint in wanted.items():
            if address in self._tasks:
                continue
            pool = store.pool_of(address)
            scraper = EndpointScraper(
                endpoint,
                engine_for(pool.engine if pool else "vllm", dict(endpoint.labels)),
                self._store,
                timeout=self._timeout,
                on_error=self._on_error,
            )
            self.scrapers[address] = scraper
            task = self._spawner.spawn(f"scrape {address}", functools.partial(self._run, scraper))
            self._tasks[address] = (endpoint, task)

    def _drop(self, address: str) -> None:
        _, task = self._tasks.pop(address)
        task.cancel()
        scraper = self.scrapers.pop(address, None)
        if scraper is not None:
            scraper.close()

    async def _run(self, scraper: EndpointScraper) -> None:
        await asyncio.sleep(self._rng.random() * self._interval)  # spread the first scrapes
        models_due = 0.0
        while True:
            started = time.monotonic()
            refresh = self._store.take_served_refresh(scraper.endpoint.address)
            if await scraper.scrape_once() and (refresh or scraper.recovered or started >= models_due):
                await scraper.models_once()
                models_due = started + self._models_interval
            period = self._interval * (0.9 + 0.2 * self._rng.random())  # ±10 % jitter
            await asyncio.sleep(max(0.0, started + period - time.monotonic()))

    def close(self) -> None:
        """Stop every loop (the supervisor waits for them at its own close)."""
        for address in list(self._tasks):
            self._drop(address)
        self._started = False


def _model_ids(body: bytes) -> frozenset[str] | None:
    """The ``id``s of an OpenAI ``/v1/models`` answer (None if it is not one)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return None
    return frozenset(m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str))
