"""The cancel poll (docs/architecture.md invariant 6): in-flight upstream calls of cancelled
batches are aborted within ``cancellation_poll_interval_ms`` (and at once when the cancel
broadcast of ``control.py`` arrives).

Under the gevent pool each attempt runs in its own greenlet, registered here with its batch.
One watcher greenlet per process asks the database, once per poll interval, which of the
batches in flight were cancelled, and kills those greenlets: urllib3 closes a connection whose
request did not finish cleanly, so the upstream sees the socket close at once. Other pools
(threads: the embedded mode, ``-P threads``) run a message's attempts on a per-process thread
pool of the worker's ``-c``, watched by one daemon thread per process that runs the same poll;
a thread cannot be interrupted, so there the attempts of a cancelled batch that have not
started by the next poll are skipped (they never reach the upstream), and a running one's
result is discarded by the fenced write-back. In both, an attempt that waited for a ``-c``
slot knows of cancellations at most ``CancelWatch.FRESH_S`` old: the poll runs that often
while attempts wait.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeAlias, TypeVar, cast

from . import workers
from .store import Store, retry_while_unreachable

log = logging.getLogger(__name__)
T = TypeVar("T")
Job: TypeAlias = tuple[Hashable, str, Callable[[], T]]  # (key, batch_id, attempt)
Done: TypeAlias = tuple[Hashable, "T | Aborted", float]  # (key, result, finished_at)


def gevent_active() -> bool:
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    return bool(monkey.is_module_patched("socket"))


class Aborted(Exception):
    """The attempt was aborted because its batch was cancelled (returned, not raised)."""


class CancelWatch:
    #: The poll's interval while attempts of this process wait for a ``-c`` slot. An attempt
    #: that starts as soon as its start statement returns knows enough (that statement skips
    #: cancelled rows); one that waited may have waited long, and at the poll interval (5 s
    #: by default) calls of a batch cancelled meanwhile still started. The watcher asks, not
    #: the attempts: an attempt that queried on getting its slot held the slot meanwhile,
    #: and the others behind the query held theirs (instant upstream: 30 % more worker CPU a
    #: request, as fewer slots were handed on).
    FRESH_S = 0.1
    #: How long an attempt that must check its row first (``_lost``) waits for the database.
    LOST_CHECK_PATIENCE_S = 60.0

    def __init__(
        self,
        store: Store,
        poll_s: float,
        concurrency: int = 64,
        processing_timeout_s: float = 600.0,
    ):
        self.store = store
        self.poll_s = max(poll_s, 0.01)  # a zero interval would spin on the database
        self.concurrency = concurrency
        #: Rows that have waited this long for a ``-c`` slot have their processing clock
        #: restarted (``Store.touch_started``), and again after each further ``touch_s``:
        #: at most a quarter of the processing timeout, so the reaper never takes a row
        #: whose call has not started, and a call that starts after a wait has at least
        #: more than half of the timeout (a wait is noticed within ``touch_s / 2``). Shorter
        #: waits, the common case, cost nothing.
        self.touch_s = min(max(processing_timeout_s / 4.0, 0.05), 5.0)
        #: Attempts waiting for a slot: (request id, token) -> when they began to wait, or
        #: were last touched.
        self._waiting: dict[Hashable, float] = {}
        self._touched_at = time.monotonic()
        self._semaphore: Any = None
        self._inflight: dict[Any, str] = {}  # unfinished greenlet or future -> its batch
        #: Batches of attempts in flight found cancelled by the last poll.
        self.cancelled: set[str] = set()
        #: Batches a cancel broadcast named (``cancel_now``) -> when (monotonic).
        self.broadcast: dict[str, float] = {}
        self._lock = threading.Lock()
        self._watcher: Any = None  # the watcher greenlet or thread
        self._pool: ThreadPoolExecutor | None = None
        #: When (monotonic) the latest poll asked the database (or the watcher started).
        self._asked_at = -1e9

    def attempts(self, flush_s: float) -> Attempts[T]:
        """A set of attempts that yields their results in chunks as they finish:
        ``(key, value or Aborted, finished_at)``. A chunk closes when the jobs added with its
        results are done, when no result came for ``Attempts.LINGER_S``, or when ``flush_s``
        has passed, so one slow request never holds back the write-back (and retry timing) of
        the fast ones. Jobs may be added while it is iterated (a hand-off adds the
        requests started in freed slots); iteration ends when none is left.

        Under gevent the jobs run concurrently, each in its own greenlet, while a process-wide
        semaphore of the worker's ``-c`` keeps this process's in-flight calls within its
        concurrency (docs/architecture.md invariant 4) however many requests a message carries.
        Elsewhere they run on a process-wide thread pool of ``-c`` threads, with the same
        bound: run one after the other, a message of 16 would have made 16 requests cost 16
        latencies."""
        if gevent_active():
            return _GreenletAttempts(self, flush_s)
        return _ThreadAttempts(self, flush_s)

    def others_waiting(self) -> bool:
        """Whether attempts of this process wait for one of its ``-c`` slots: then a slot that
        frees is theirs, not a hand-off's. (The thread pool's queue of unstarted work is a
        private attribute of ``ThreadPoolExecutor``; it has no public count.)"""
        if self._semaphore is not None and self._semaphore.linkcount() > 0:
            return True
        pool = self._pool
        return pool is not None and pool._work_queue.qsize() > 0

    def cancel_now(self, batch_ids: Iterable[str]) -> int:
        """Abort this process's attempts of ``batch_ids`` at once (a cancel broadcast,
        ``control.py``): unstarted ones are skipped; under gevent running ones are killed,
        which closes their upstream connections. Returns how many were in flight."""
        wanted = set(batch_ids)
        with self._lock:
            victims = [h for h, b in self._inflight.items() if b in wanted]
            # Kept apart from the poll's answer, which may come from a query that began
            # before the cancel committed and would otherwise erase these; kept until the
            # poll has surely seen the cancel, so a busy worker's set does not grow for ever.
            now = time.monotonic()
            keep = now - max(3 * self.poll_s, 60.0)
            self.broadcast = {b: t for b, t in self.broadcast.items() if t > keep}
            self.broadcast.update(dict.fromkeys(wanted, now))
        for handle in victims:
            if hasattr(handle, "kill") and not handle.dead:
                handle.kill(block=False)
        return len(victims)

    def _unless_cancelled(
        self, key: Hashable, batch_id: str, fn: Callable[[], T], created: float
    ) -> T | Aborted:
        if batch_id in self.cancelled or batch_id in self.broadcast or self._lost(key, created):
            return Aborted(batch_id)
        try:
            return fn()
        except Aborted as aborted:  # the attempt saw the cancel itself (a processor's check)
            return aborted

    def _lost(self, key: Hashable, created: float) -> bool:
        """Whether the row of this attempt (started at ``created``, monotonic) may have been
        taken back while this process was frozen or cut off (``workers.may_have_been_reaped``):
        then, and only then, one query asks whether the row still holds the attempt's token.
        Why: a worker thawed after SIGCONT sent the requests that had waited for its ``-c``
        slots, though the reaper had given them to another worker, which had sent them. A
        check that fails counts as lost: not sending costs a reclaim (the row stays fenced
        and is reaped), sending may cost a second paid call."""
        if not workers.may_have_been_reaped(created):
            return False
        request_id, token = cast(tuple[int, str], key)  # execute's (id, token) keys
        try:
            return not retry_while_unreachable(
                lambda: self.store.still_held(request_id, token),
                self.LOST_CHECK_PATIENCE_S,
                "the check that a request is still held",
            )
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("could not check whether a request is still held; not sent: %s", exc)
            return True

    def _poll(self) -> set[str] | None:
        """Which batches of the attempts in flight are cancelled (None: nothing in flight or
        the query failed; the last answer stands)."""
        with self._lock:
            batches = set(self._inflight.values())
        if not batches:
            return None
        self._asked_at = time.monotonic()
        try:
            cancelled = self.store.cancelled_among(batches)
        except Exception as exc:  # noqa: BLE001 - the next poll asks again
            log.warning("cancel poll failed: %s", exc)
            return None
        # Replaced, not grown: a cancelled batch stays cancelled, so while it has attempts in
        # flight every poll finds it again.
        self.cancelled = cancelled
        return cancelled

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=max(1, self.concurrency), thread_name_prefix="fusillade-attempt"
                )
            return self._pool

    def _limited(
        self, key: Hashable, batch_id: str, fn: Callable[[], T], created: float
    ) -> T | Aborted:
        """Run ``fn`` in one of the process's ``-c`` slots (greenlets). An attempt that has
        to wait for one is registered as waiting meanwhile, so the watcher keeps its row's
        processing clock from running out (``_touch``)."""
        slots = self._slots()
        if slots.locked():
            self._waiting[key] = time.monotonic()
            try:
                slots.acquire()
            finally:
                self._waiting.pop(key, None)
        else:
            slots.acquire()
        try:
            return self._unless_cancelled(key, batch_id, fn, created)
        finally:
            slots.release()

    def _queued(self, key: Hashable) -> None:
        """A job handed to the thread pool: waiting until ``_threaded`` starts it."""
        with self._lock:
            self._waiting[key] = time.monotonic()

    def _threaded(
        self, key: Hashable, batch_id: str, fn: Callable[[], T], created: float
    ) -> T | Aborted:
        with self._lock:  # against _touch's update of the same key
            self._waiting.pop(key, None)
        return self._unless_cancelled(key, batch_id, fn, created)

    def _touch(self) -> None:
        """Restart the processing clock of the rows that have waited ``touch_s`` for a slot
        since they began to wait or were last touched (``Store.touch_started``). Checked on
        the watcher's ticks, at most once per ``touch_s / 2``."""
        now = time.monotonic()
        if now - self._touched_at < self.touch_s / 2:
            return
        self._touched_at = now
        due = [key for key, since in self._waiting.copy().items() if now - since >= self.touch_s]
        if not due:
            return
        try:
            self.store.touch_started(due, time.time())  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            log.warning("could not restart the processing clock of waiting requests: %s", exc)
            return
        with self._lock:  # a job may have started meanwhile (threads): not put back
            for key in due:
                if key in self._waiting:
                    self._waiting[key] = now

    def _slots(self) -> Any:
        if self._semaphore is None:
            from gevent.lock import BoundedSemaphore

            self._semaphore = BoundedSemaphore(self.concurrency)
        return self._semaphore

    def _ensure_watcher(self) -> None:
        """Start the poll unless it runs (call after registering in ``_inflight``: the poll
        ends, under the same lock, once it finds nothing in flight; one that died of an
        error is replaced)."""
        with self._lock:
            if self._watcher is not None and _alive(self._watcher):
                return
            self._asked_at = time.monotonic()  # the start statement just asked
            if gevent_active():
                import gevent

                self._watcher = gevent.spawn(self._watch, gevent.sleep, True)
            else:
                self._watcher = threading.Thread(
                    target=self._watch,
                    args=(time.sleep, False),
                    name="fusillade-cancel-watch",
                    daemon=True,
                )
                self._watcher.start()

    def _watch(self, sleep: Callable[[float], None], kill: bool) -> None:
        """Once per poll interval while attempts are in flight, and every ``FRESH_S`` while
        some of them wait for a slot: which of their batches were cancelled. Attempts of
        those batches that have not started are then skipped (``_unless_cancelled``); with
        ``kill`` (greenlets) the running ones are killed too."""
        tick = min(self.poll_s, self.FRESH_S)
        while True:
            sleep(tick)
            self._touch()
            due = time.monotonic() - self._asked_at >= self.poll_s - tick / 2
            if not due and not self.others_waiting():
                continue
            with self._lock:
                inflight = list(self._inflight.items())
                if not inflight:
                    self._watcher = None
                    self.cancelled = set()
                    self.broadcast = {}
                    self._waiting.clear()  # nothing in flight: nothing waits
                    return
            cancelled = self._poll()
            if not cancelled or not kill:
                continue
            victims = [g for g, b in inflight if b in cancelled and not g.dead]
            log.info("aborting %d in-flight requests of cancelled batches", len(victims))
            for g in victims:
                g.kill(block=False)


def _alive(watcher: Any) -> bool:
    """Whether the watcher thread or greenlet still runs."""
    if isinstance(watcher, threading.Thread):
        return watcher.is_alive()
    return not watcher.dead


class Attempts(Generic[T]):
    """What ``CancelWatch.attempts`` returns: ``add`` jobs, iterate chunks of results, and
    leave the ``with`` block to abandon what is still running (its rows are fenced).

    A chunk opens with the first result and closes when no other result came within
    ``LINGER_S`` of the last one, when ``flush_s`` has passed since it opened, or when every
    job added with those of its results (one ``add``: sent together) is done. Why a linger
    and not "until every job is done": once freed slots are handed on, a message holds
    attempts of different ages, and waiting for all of them kept each finished one waiting
    up to ``flush_s`` (0.15 s of every 1 s call at 200 in flight). The responses of attempts
    sent together arrive together, a few milliseconds apart, so they still share one
    write-back; and once the last of them is in, nothing else is due soon, so the chunk
    closes then rather than a linger later (a linger of every 1 s call at 1,000 in flight,
    benchmark "latency")."""

    #: Longest gap between two results of one chunk.
    LINGER_S = 0.005

    def __init__(self, watch: CancelWatch, flush_s: float):
        self.watch = watch
        self.flush_s = flush_s
        #: Jobs added and not yet yielded: their greenlet or future -> (key, batch id, group).
        self._pending: dict[Any, tuple[Hashable, str, int]] = {}
        #: Jobs not yet yielded per group (the jobs of one ``add``).
        self._unfinished: dict[int, int] = {}
        self._groups = 0
        #: The groups of the results taken into the chunk being formed (``__iter__``).
        self._taken: set[int] = set()

    def add(self, jobs: Sequence[Job[T]], created: float | None = None) -> None:
        """Start ``jobs``; ``created`` (monotonic) is when their rows were started, taken
        before that statement (default: now)."""
        if not jobs:
            return
        self._groups += 1
        group = self._groups
        self._unfinished[group] = len(jobs)
        if created is None:
            created = time.monotonic()
        for key, batch_id, fn in jobs:
            handle = self._start(key, batch_id, fn, created)
            self.watch._inflight[handle] = batch_id
            self._pending[handle] = (key, batch_id, group)
        self.watch._ensure_watcher()

    def _left(self) -> int:
        return len(self._pending)

    def _next(self, timeout: float | None) -> Done[T] | None:
        """The next finished job, waiting at most ``timeout`` (None: until one finishes)."""
        handle = self._finished_within(timeout)
        if handle is None:
            return None
        self.watch._inflight.pop(handle, None)
        job = self._pending.pop(handle, None)
        if job is None:
            return None  # abandoned by close
        key, batch_id, group = job
        left = self._unfinished.pop(group) - 1
        if left:
            self._unfinished[group] = left
        self._taken.add(group)
        return (key, self._result(handle, batch_id), time.time())

    def _taken_groups_done(self) -> bool:
        """Whether every group of the results taken into this chunk has finished."""
        return not any(g in self._unfinished for g in self._taken)

    def close(self) -> None:
        pending, self._pending = self._pending, {}
        self._unfinished.clear()
        for handle, (key, _, _) in pending.items():
            self.watch._inflight.pop(handle, None)
            self.watch._waiting.pop(key, None)  # abandoned: nothing to keep alive
            self._stop(handle)

    # What a pool provides: start a job (its handle is put on the pool's queue of finished
    # jobs when it ends), take the next finished one, read its result, stop an unfinished one.

    def _start(self, key: Hashable, batch_id: str, fn: Callable[[], T], created: float) -> Any:
        raise NotImplementedError

    def _finished_within(self, timeout: float | None) -> Any:
        raise NotImplementedError

    def _result(self, handle: Any, batch_id: str) -> T | Aborted:
        raise NotImplementedError

    def _stop(self, handle: Any) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[Done[T]]]:
        while self._left():
            first = self._next(None)
            if first is None:
                continue
            chunk = [first]
            closes = time.monotonic() + self.flush_s
            while self._left() and not self._taken_groups_done():
                wait = min(self.LINGER_S, closes - time.monotonic())
                done = self._next(wait) if wait > 0 else None
                if done is None:
                    break
                chunk.append(done)
            self._taken.clear()
            yield chunk

    def __enter__(self) -> Attempts[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _GreenletAttempts(Attempts[T]):
    def __init__(self, watch: CancelWatch, flush_s: float):
        from gevent.queue import Queue

        super().__init__(watch, flush_s)
        self._finished: Any = Queue()  # finished greenlets, put by their link callback

    def _start(self, key: Hashable, batch_id: str, fn: Callable[[], T], created: float) -> Any:
        import gevent

        g = gevent.spawn(self.watch._limited, key, batch_id, fn, created)
        g.link(self._finished.put_nowait)
        return g

    def _finished_within(self, timeout: float | None) -> Any:
        from gevent.queue import Empty

        try:
            return self._finished.get(timeout=timeout)
        except Empty:
            return None

    def _result(self, handle: Any, batch_id: str) -> T | Aborted:
        import gevent

        if isinstance(handle.value, (gevent.GreenletExit, Aborted)):
            return Aborted(batch_id)
        if not handle.successful():
            assert handle.exception is not None
            raise handle.exception
        return handle.value

    def _stop(self, handle: Any) -> None:
        handle.kill(block=False)


class _ThreadAttempts(Attempts[T]):
    def __init__(self, watch: CancelWatch, flush_s: float):
        super().__init__(watch, flush_s)
        self._finished: queue.SimpleQueue[Future[T | Aborted]] = queue.SimpleQueue()

    def _start(self, key: Hashable, batch_id: str, fn: Callable[[], T], created: float) -> Any:
        self.watch._queued(key)
        future = self.watch._executor().submit(self.watch._threaded, key, batch_id, fn, created)
        future.add_done_callback(self._finished.put)
        return future

    def _finished_within(self, timeout: float | None) -> Any:
        try:
            return self._finished.get(timeout=timeout)
        except queue.Empty:
            return None

    def _result(self, handle: Any, batch_id: str) -> T | Aborted:
        return handle.result()

    def _stop(self, handle: Any) -> None:
        handle.cancel()


#: This process's watches, by (pid, -c, engine): a worker has one; an embedded run in a
#: process that ran another with another concurrency or database file gets its own (the first
#: one's pool has its -c, and its polls ask its database).
_watches: dict[tuple[int, int, Any], CancelWatch] = {}


def cancel_now(batch_ids: Iterable[str]) -> int:
    """``CancelWatch.cancel_now`` on this process's watches."""
    import os

    wanted = list(batch_ids)
    pid = os.getpid()
    return sum(w.cancel_now(wanted) for (p, _, _), w in list(_watches.items()) if p == pid)


def get_watch(
    store: Store, poll_s: float, concurrency: int, processing_timeout_s: float = 600.0
) -> CancelWatch:
    import os

    key = (os.getpid(), concurrency, store.engine)
    watch = _watches.get(key)
    if watch is None:
        watch = _watches[key] = CancelWatch(store, poll_s, concurrency, processing_timeout_s)
    return watch
