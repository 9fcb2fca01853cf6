"""Per-endpoint metric scrape loops.

One loop per endpoint (primary and mirror pool), each on its own cadence with jitter so
pods are not hit in lock-step, each bounded by a timeout, so one slow pod never stales
another.  A scrape asks only for the families the engine mapping needs
(``?name[]=…``, honoured by prometheus_client servers such as vLLM) over a kept-alive
connection (:mod:`epp.datalayer.httpget`) and reads at most ``max_bytes``.  Failures
of any kind (connection, HTTP status, timeout, oversize, garbage) are counted per pod
and leave the last metrics in place, where their age marks them stale.  Membership
belongs to discovery: loops follow the datastore.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from urllib.parse import urlencode

from epp.datalayer.datastore import Datastore
from epp.datalayer.engines import EngineMapping, engine_for
from epp.datalayer.exposition import ExpositionError, parse_metrics
from epp.datalayer.httpget import HttpGetError, HttpGetter
from epp.domain import Endpoint

log = logging.getLogger(__name__)

ErrorHook = Callable[[Endpoint, str], None]


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
        self.errors = 0
        self.successes = 0

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

    async def scrape_once(self) -> bool:
        """Fetch and store one scrape; False (and the error counted) when it failed."""
        try:
            text = await self.fetch()
            metrics = parse_metrics(text, self.mapping, self._clock())
        except ScrapeFailed as exc:
            return self._failed(exc.reason, str(exc))
        except (ExpositionError, UnicodeError) as exc:
            return self._failed("parse", str(exc))
        self._store.set_metrics(self.endpoint.address, metrics)
        self.successes += 1
        return True

    def _failed(self, reason: str, detail: str) -> bool:
        self.errors += 1
        if self._on_error is not None:
            self._on_error(self.endpoint, reason)
        if self.errors == 1 or self.errors % 100 == 0:
            log.warning(
                "scrape of %s failed (%s): %s [%d failures]", self.endpoint.address, reason, detail, self.errors
            )
        return False


class ScrapeLoops:
    """Owns one scrape task per endpoint; follows datastore membership changes."""

    def __init__(
        self,
        store: Datastore,
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        on_error: ErrorHook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._interval = interval
        self._timeout = timeout
        self._on_error = on_error
        self._rng = rng or random.Random()
        self._tasks: dict[str, tuple[Endpoint, asyncio.Task[None]]] = {}
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
        wanted: dict[str, tuple[Endpoint, str]] = {e.address: (e, store.engine) for e in store.endpoints()}
        for e in store.mirror_endpoints():
            wanted.setdefault(e.address, (e, store.mirror_engine))
        for address in list(self._tasks):
            endpoint, task = self._tasks[address]
            if address not in wanted or wanted[address][0] != endpoint:
                task.cancel()
                del self._tasks[address]
                scraper = self.scrapers.pop(address, None)
                if scraper is not None:
                    scraper.close()
        loop = asyncio.get_running_loop()
        for address, (endpoint, engine) in wanted.items():
            if address in self._tasks:
                continue
            scraper = EndpointScraper(
                endpoint,
                engine_for(engine, dict(endpoint.labels)),
                self._store,
                timeout=self._timeout,
                on_error=self._on_error,
            )
            self.scrapers[address] = scraper
            self._tasks[address] = (endpoint, loop.create_task(self._run(scraper), name=f"scrape {address}"))

    async def _run(self, scraper: EndpointScraper) -> None:
        await asyncio.sleep(self._rng.random() * self._interval)  # spread the first scrapes
        while True:
            started = time.monotonic()
            await scraper.scrape_once()
            period = self._interval * (0.9 + 0.2 * self._rng.random())  # ±10 % jitter
            await asyncio.sleep(max(0.0, started + period - time.monotonic()))

    async def aclose(self) -> None:
        tasks = [t for _, t in self._tasks.values()]
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for scraper in self.scrapers.values():
            scraper.close()
        self.scrapers.clear()
        self._started = False
