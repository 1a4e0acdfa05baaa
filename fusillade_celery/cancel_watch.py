"""The cancel poll (DESIGN.md invariant 6): in-flight upstream calls of cancelled batches are
aborted within ``cancellation_poll_interval_ms``.

Under the gevent pool each attempt runs in its own greenlet, registered here with its batch.
One watcher greenlet per process asks the database, once per poll interval, which of the
batches in flight were cancelled, and kills those greenlets: urllib3 closes a connection whose
request did not finish cleanly, so the upstream sees the socket close at once. Other pools
cannot interrupt a blocking call; there the result is discarded by the fenced write-back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")


def gevent_active() -> bool:
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    return bool(monkey.is_module_patched("socket"))


class Aborted(Exception):
    """The attempt was aborted because its batch was cancelled."""


class CancelWatch:
    def __init__(self, store: Store, poll_s: float):
        self.store = store
        self.poll_s = poll_s
        self._inflight: dict[int, tuple[str, Any]] = {}
        self.cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._watcher: Any = None

    def run(self, key: int, batch_id: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` abortably; raise :class:`Aborted` if its batch is cancelled meanwhile."""
        if batch_id in self.cancelled:
            raise Aborted(batch_id)
        if not gevent_active():
            return fn()
        import gevent

        self._ensure_watcher()
        g = gevent.spawn(fn)
        self._inflight[key] = (batch_id, g)
        try:
            g.join()
        finally:
            self._inflight.pop(key, None)
        if isinstance(g.value, gevent.GreenletExit):  # killed by the watcher
            raise Aborted(batch_id)
        if not g.successful():
            assert g.exception is not None
            raise g.exception
        result: T = g.value
        return result

    def _ensure_watcher(self) -> None:
        import gevent

        with self._lock:
            if self._watcher is None or self._watcher.dead:
                self._watcher = gevent.spawn(self._watch)

    def _watch(self) -> None:
        import gevent

        while True:
            gevent.sleep(self.poll_s)
            if not self._inflight:
                continue
            batches = {b for b, _ in self._inflight.values()}
            try:
                cancelled = self.store.cancelled_among(batches)
            except Exception as exc:
                log.warning("cancel poll failed: %s", exc)
                continue
            if not cancelled:
                continue
            self.cancelled |= cancelled
            victims = [g for b, g in list(self._inflight.values()) if b in cancelled]
            log.info("aborting %d in-flight requests of cancelled batches", len(victims))
            for g in victims:
                g.kill(block=False)


_watches: dict[int, CancelWatch] = {}


def get_watch(store: Store, poll_s: float) -> CancelWatch:
    import os

    watch = _watches.get(os.getpid())
    if watch is None:
        watch = _watches[os.getpid()] = CancelWatch(store, poll_s)
    return watch
