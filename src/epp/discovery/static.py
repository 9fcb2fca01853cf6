"""Static discovery: the pool file, re-read when it changes.

The file is polled (mtime, size) every ``interval`` seconds off the event loop; a
changed file that fails validation is logged and ignored, so a typo never empties a
running pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from epp.config import PoolFile, load_pool_file
from epp.datalayer import Datastore
from epp.errors import ConfigError

log = logging.getLogger(__name__)


def apply_pool_file(store: Datastore, pool_file: PoolFile) -> None:
    store.set_pool(
        pool_file.pool.endpoint_list(),
        policies=pool_file.policies(),
        objectives=pool_file.objective_priorities(),
        mirror=pool_file.mirror.endpoint_list() if pool_file.mirror else (),
        pool_name=pool_file.pool.name,
        mirror_name=pool_file.mirror.name if pool_file.mirror else "",
        engine=pool_file.pool.engine,
        mirror_engine=pool_file.mirror.engine if pool_file.mirror else "vllm",
    )


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class StaticPoolSource:
    """Owns the pool-file watch loop."""

    def __init__(self, path: str, store: Datastore, *, interval: float = 1.0) -> None:
        self.path = Path(path)
        self._store = store
        self._interval = interval
        self._sig: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0
        self.changed = asyncio.Event()

    def load(self) -> PoolFile:
        """First load: errors propagate (exit code 2 at start)."""
        self._sig = _signature(self.path)
        pool_file = load_pool_file(self.path)
        apply_pool_file(self._store, pool_file)
        return pool_file

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
        apply_pool_file(self._store, pool_file)
        self.reloads += 1
        self.changed.set()
        log.info("pool file reloaded: %d endpoints", len(self._store.endpoints()))
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_once()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pool-file-watch")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = ["StaticPoolSource", "apply_pool_file"]
