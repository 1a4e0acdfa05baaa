"""Worker registry and heartbeats: a row per worker process, so the reaper can tell a slow
worker from a dead one (docs/architecture.md section 6).

The heartbeat runs in a daemon thread (a greenlet under ``-P gevent``, where threads are
monkey-patched). A clean shutdown marks the row dead, so the reaper hands its requests back at
once instead of after the stale threshold.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid

from . import metrics
from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)


#: This process's id, per pid (a forked child gets its own).
_IDS: dict[int, str] = {}


def worker_id() -> str:
    """``host:pid:nonce`` of this process: what ``requests.worker_id`` records while
    processing. The nonce, new in every process, is why: a container restarted after a crash
    keeps its hostname and often its pid (1), and with ``host:pid`` alone its first heartbeat
    marked the dead predecessor's row alive again, so the predecessor's requests held the
    model's slots until the processing timeout (10 min) instead of the stale-worker
    threshold (30 s)."""
    pid = os.getpid()
    wid = _IDS.get(pid)
    if wid is None:
        wid = _IDS[pid] = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"
    return wid


class Heartbeat:
    """This process's row in the workers table, beaten every ``heartbeat_interval_ms`` from a
    thread; and what the process knows of its own liveness as the reaper sees it: since when
    its heartbeats reach the database (``reachable_since``), and when it last came back from
    a gap long enough to have been taken for dead (``gap_ended``)."""

    def __init__(
        self, store: Store, settings: Settings, queues: str, concurrency: int | None = None
    ):
        self.store = store
        self.concurrency = concurrency
        self.interval = settings.heartbeat_interval_ms / 1000.0
        #: A silence this long may have let the reaper take this process's requests: half the
        #: stale threshold (a margin for the reaper's clock and cadence), but above the
        #: heartbeat interval, or every beat would count as a gap and every call would query.
        stale_s = settings.stale_worker_threshold_ms / 1000.0
        self.gap_s = min(max(stale_s / 2, 1.5 * self.interval), 0.9 * stale_s)
        self.queues = queues
        self.id = worker_id()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: When (monotonic) a heartbeat of this process last reached the database (never:
        #: -inf, so a process that could not register counts as silent).
        self.last_ok = -math.inf
        #: When (monotonic) the latest heartbeat that followed a silence of ``gap_s`` or
        #: more reached the database: attempts created before it must check their row.
        self.gap_ended = -math.inf
        #: Since when (monotonic) every heartbeat of this process has reached the database;
        #: None while the last one failed (or none has succeeded yet).
        self.reachable_since: float | None = None

    def start(self) -> None:
        """Beat once, then keep beating in a thread. A first beat that fails (the database
        restarting as the worker starts) is retried by the thread like any other: meanwhile
        the process counts as unreachable (``db_reachable_for`` 0, ``may_have_been_reaped``)."""
        self._beat_and_note()
        self._thread = threading.Thread(target=self._run, name="fusillade-heartbeat", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        started = time.perf_counter()
        self.store.heartbeat(
            self.id, socket.gethostname(), os.getpid(), self.queues, time.time(), self.concurrency
        )
        metrics.observe_heartbeat(time.perf_counter() - started)

    def _beat_and_note(self) -> None:
        try:
            self.beat()
        except Exception as exc:  # the database may be away for a while; keep trying
            self.reachable_since = None
            log.warning("heartbeat failed: %s", exc)
            return
        now = time.monotonic()
        if now - self.last_ok >= self.gap_s:
            self.gap_ended = now
        self.last_ok = now
        if self.reachable_since is None:
            self.reachable_since = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat_and_note()

    def may_have_been_reaped(self, since: float) -> bool:
        """Whether the reaper may have taken back a request this process started at
        ``since`` (monotonic): it is silent now, or has been since then."""
        return time.monotonic() - self.last_ok >= self.gap_s or self.gap_ended >= since

    def stop(self) -> None:
        """Clean shutdown: stop beating and mark this worker dead."""
        self._stop.set()
        try:
            self.store.mark_worker_dead(self.id, time.time())
        except Exception as exc:
            log.warning("could not mark worker %s dead: %s", self.id, exc)


#: This process's heartbeat (none or one), emptied in a forked child, which starts its own:
#: read before every upstream call (``may_have_been_reaped``), so without a ``getpid``.
_mine: list[Heartbeat] = []
os.register_at_fork(after_in_child=_mine.clear)


def start(
    store: Store, settings: Settings, queues: str, concurrency: int | None = None
) -> Heartbeat:
    """Start this process's heartbeat once (a forked child starts its own)."""
    if _mine:
        return _mine[0]
    hb = Heartbeat(store, settings, queues, concurrency)
    _mine.append(hb)
    hb.start()
    return hb


def db_reachable_for() -> float:
    """How long this process's heartbeats have reached the database without a failure
    (seconds; 0 while they fail; infinite in a process without a heartbeat, such as a test
    or a client calling maintenance itself)."""
    if not _mine:
        return float("inf")
    hb = _mine[0]
    if hb.reachable_since is None:
        return 0.0
    return time.monotonic() - hb.reachable_since


def may_have_been_reaped(since: float) -> bool:
    """Whether a request this process started at ``since`` (monotonic) may have been taken
    back by the reaper as a dead worker's: the process is silent (frozen: SIGSTOP, a stalled
    VM; or cut off from the database), or has come back from such a silence since. Asked
    before every upstream call: a list read and two float comparisons."""
    return bool(_mine) and _mine[0].may_have_been_reaped(since)


def stop() -> None:
    if _mine:
        _mine.pop().stop()
