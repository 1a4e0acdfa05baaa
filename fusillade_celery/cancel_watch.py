"""The cancel poll (DESIGN.md invariant 6): in-flight upstream calls of cancelled batches are
aborted within ``cancellation_poll_interval_ms``.

Under the gevent pool each attempt runs in its own greenlet, registered here with its batch.
One watcher greenlet per process asks the database, once per poll interval, which of the
batches in flight were cancelled, and kills those greenlets: urllib3 closes a connection whose
request did not finish cleanly, so the upstream sees the socket close at once. Other pools
(threads: the embedded mode, ``-P threads``) run a message's attempts on a per-process thread
pool of the worker's ``-c``; a thread cannot be interrupted, so there an attempt of a cancelled
batch that has not started is skipped, and a running one's result is discarded by the fenced
write-back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, TypeAlias, TypeVar

from .store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
Job: TypeAlias = tuple[int, str, Callable[[], T]]  # (key, batch_id, attempt)
Done: TypeAlias = tuple[int, "T | Aborted", float]  # (key, result, finished_at)


def gevent_active() -> bool:
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    return bool(monkey.is_module_patched("socket"))


class Aborted(Exception):
    """The attempt was aborted because its batch was cancelled (returned, not raised)."""


class CancelWatch:
    def __init__(self, store: Store, poll_s: float, concurrency: int = 64):
        self.store = store
        self.poll_s = poll_s
        self.concurrency = concurrency
        self._semaphore: Any = None
        self._inflight: dict[int, tuple[str, Any]] = {}
        self.cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._watcher: Any = None
        self._pool: ThreadPoolExecutor | None = None

    def run_iter(self, jobs: Sequence[Job[T]], flush_s: float) -> Iterator[list[Done[T]]]:
        """Run the jobs ``(key, batch_id, fn)`` of one message and yield their results in
        chunks as they finish: ``(key, value or Aborted, finished_at)``. A chunk closes when
        every job is done or ``flush_s`` has passed, so one slow request never holds back the
        write-back (and retry timing) of the fast ones.

        Under gevent the jobs run concurrently, each in its own greenlet, while a process-wide
        semaphore of the worker's ``-c`` keeps this process's in-flight calls within its
        concurrency (DESIGN.md invariant 4) however many requests a message carries. Elsewhere
        they run on a process-wide thread pool of ``-c`` threads, with the same bound: run one
        after the other, a message of 16 would have made 16 requests cost 16 latencies."""
        if not gevent_active():
            yield from self._threaded(jobs, flush_s)
            return
        import gevent

        self._ensure_watcher()
        pending: dict[Any, tuple[int, str]] = {}
        for key, batch_id, fn in jobs:
            g = gevent.spawn(self._limited, batch_id, fn)
            self._inflight[key] = (batch_id, g)
            pending[g] = (key, batch_id)
        try:
            while pending:
                ready = gevent.wait(list(pending), timeout=flush_s)
                chunk: list[Done[T]] = []
                for g in ready:
                    key, batch_id = pending.pop(g)
                    self._inflight.pop(key, None)
                    if isinstance(g.value, (gevent.GreenletExit, Aborted)):
                        chunk.append((key, Aborted(batch_id), time.time()))
                    elif not g.successful():
                        assert g.exception is not None
                        raise g.exception
                    else:
                        chunk.append((key, g.value, time.time()))
                if chunk:
                    yield chunk
        finally:
            for g, (key, _) in pending.items():
                self._inflight.pop(key, None)
                g.kill(block=False)

    def _threaded(self, jobs: Sequence[Job[T]], flush_s: float) -> Iterator[list[Done[T]]]:
        executor = self._executor()
        pending: dict[Future[T | Aborted], int] = {
            executor.submit(self._unless_cancelled, batch_id, fn): key for key, batch_id, fn in jobs
        }
        try:
            while pending:
                done, _ = futures_wait(list(pending), timeout=flush_s)
                chunk: list[Done[T]] = []
                for future in done:
                    key = pending.pop(future)
                    chunk.append((key, future.result(), time.time()))
                if chunk:
                    yield chunk
        finally:
            for future in pending:
                future.cancel()

    def _unless_cancelled(self, batch_id: str, fn: Callable[[], T]) -> T | Aborted:
        return Aborted(batch_id) if batch_id in self.cancelled else fn()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=max(1, self.concurrency), thread_name_prefix="fusillade-attempt"
                )
            return self._pool

    def _limited(self, batch_id: str, fn: Callable[[], T]) -> T | Aborted:
        with self._slots():
            return self._unless_cancelled(batch_id, fn)

    def _slots(self) -> Any:
        if self._semaphore is None:
            from gevent.lock import BoundedSemaphore

            self._semaphore = BoundedSemaphore(self.concurrency)
        return self._semaphore

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


def get_watch(store: Store, poll_s: float, concurrency: int) -> CancelWatch:
    import os

    watch = _watches.get(os.getpid())
    if watch is None:
        watch = _watches[os.getpid()] = CancelWatch(store, poll_s, concurrency)
    return watch
