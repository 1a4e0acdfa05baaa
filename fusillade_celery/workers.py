"""Worker registry and heartbeats: a row per worker process, so the reaper can tell a slow
worker from a dead one (docs/architecture.md section 6).

The heartbeat runs in a daemon thread (a greenlet under ``-P gevent``, where threads are
monkey-patched). A clean shutdown marks the row dead, so the reaper hands its requests back at
once instead of after the stale threshold.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

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
    def __init__(
        self, store: Store, settings: Settings, queues: str, concurrency: int | None = None
    ):
        self.store = store
        self.concurrency = concurrency
        self.interval = settings.heartbeat_interval_ms / 1000.0
        self.stale_s = settings.stale_worker_threshold_ms / 1000.0
        #: When (monotonic) a heartbeat of this process last reached the database.
        self.last_ok = time.monotonic()
        self.queues = queues
        self.id = worker_id()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Since when (monotonic) every heartbeat of this process has reached the database;
        #: None while the last one failed.
        self.reachable_since: float | None = None

    def start(self) -> None:
        self.beat()
        self.reachable_since = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="fusillade-heartbeat", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self.store.heartbeat(
            self.id, socket.gethostname(), os.getpid(), self.queues, time.time(), self.concurrency
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # the database may be away for a while; keep trying
                self.reachable_since = None
                log.warning("heartbeat failed: %s", exc)
            else:
                self.last_ok = time.monotonic()
                if self.reachable_since is None:
                    self.reachable_since = time.monotonic()

    def stop(self) -> None:
        """Clean shutdown: stop beating and mark this worker dead."""
        self._stop.set()
        try:
            self.store.mark_worker_dead(self.id, time.time())
        except Exception as exc:
            log.warning("could not mark worker %s dead: %s", self.id, exc)


_current: dict[int, Heartbeat] = {}


def start(
    store: Store, settings: Settings, queues: str, concurrency: int | None = None
) -> Heartbeat:
    """Start this process's heartbeat once (idempotent per pid)."""
    hb = _current.get(os.getpid())
    if hb is None:
        hb = Heartbeat(store, settings, queues, concurrency)
        hb.start()
        _current[os.getpid()] = hb
    return hb


def db_reachable_for() -> float:
    """How long this process's heartbeats have reached the database without a failure
    (seconds; 0 while they fail; infinite in a process without a heartbeat, such as a test
    or a client calling maintenance itself)."""
    hb = _current.get(os.getpid())
    if hb is None:
        return float("inf")
    if hb.reachable_since is None:
        return 0.0
    return time.monotonic() - hb.reachable_since


def may_have_been_reaped() -> bool:
    """Whether this process went long enough without a heartbeat (frozen: SIGSTOP, a stalled
    VM; or cut off from the database) that the reaper may have taken its requests as a dead
    worker's: half the stale threshold, a margin for clocks and the reaper's cadence. A
    float comparison, cheap enough to ask before every upstream call."""
    hb = _current.get(os.getpid())
    return hb is not None and time.monotonic() - hb.last_ok > hb.stale_s / 2


def stop() -> None:
    hb = _current.pop(os.getpid(), None)
    if hb is not None:
        hb.stop()
