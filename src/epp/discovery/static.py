"""Static discovery: the pool file (llm-d calls this file discovery), re-read when it changes.

The file is polled (mtime, size) every ``interval`` seconds off the event loop; a
changed file that fails validation, or that would leave a serving pool with no endpoint
at all, is logged and ignored, so a typo never empties a running pool (to retire a
pool, stop epp).  The first load's errors propagate: a bad file at start is exit code 2.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from epp.config import PoolFile, load_pool_file
from epp.discovery import PoolSink
from epp.errors import ConfigError

log = logging.getLogger(__name__)


def apply_pool_file(sink: PoolSink, pool_file: PoolFile) -> None:
    """Hand a pool file's pool, mirror pool and model policies to the sink in one change."""
    sink.apply(pool_file.pool.to_pool(), pool_file.mirror.to_pool() if pool_file.mirror else None, pool_file.policies())


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class StaticPoolSource:
    """The pool file as a :class:`~epp.discovery.PoolSource`."""

    def __init__(self, path: str, sink: PoolSink, *, interval: float = 1.0) -> None:
        self.path = Path(path)
        self._sink = sink
        self._interval = interval
        self._sig: tuple[int, int] | None = None
        self._loaded_endpoints = 0
        self.changed = asyncio.Event()  # set at every applied reload (tests wait on it)

    async def sync(self) -> None:
        self._sig = await asyncio.to_thread(_signature, self.path)
        pool_file = await asyncio.to_thread(load_pool_file, self.path)
        self._loaded_endpoints = len(pool_file.pool.endpoints)
        apply_pool_file(self._sink, pool_file)

    async def check_once(self) -> bool:
        """Reload if the file changed; return True when a new pool was applied."""
        sig = await asyncio.to_thread(_signature, self.path)
        if sig is None or sig == self._sig:
            return False
        self._sig = sig
        try:
            pool_file = await asyncio.to_thread(load_pool_file, self.path)
        except ConfigError as exc:
            log.error("pool file change ignored: %s", exc)
            return False
        if not pool_file.pool.endpoints and self._loaded_endpoints:
            log.error("pool file change ignored: %s lists no endpoint, which would empty the running pool", self.path)
            return False
        self._loaded_endpoints = len(pool_file.pool.endpoints)
        apply_pool_file(self._sink, pool_file)
        self.changed.set()
        log.info("pool file reloaded: %d endpoints", len(pool_file.pool.endpoints))
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_once()


__all__ = ["StaticPoolSource", "apply_pool_file"]
