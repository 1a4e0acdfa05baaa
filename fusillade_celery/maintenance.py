"""Periodic housekeeping (docs/architecture.md section 6): finalize, expire, reap.

Each function is one pass, safe to run concurrently with itself and with workers: every
statement it issues is conditional on the state it expects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from . import metrics, workers
from .retry import backoff_s, expiry_grace_s
from .settings import Settings
from .states import ErrorKind
from .store import Store

log = logging.getLogger(__name__)


def finalize(store: Store, settings: Settings, now: float | None = None) -> dict[str, list[str]]:
    """Expire overdue batches, then close the ones whose requests are all terminal."""
    now = time.time() if now is None else now
    failed: dict[str, int] = {}
    expired = store.expire_batches(now, expiry_grace_s(settings), failed_by_model=failed)
    for batch_id in expired:
        log.info("batch %s expired", batch_id)
    for model, n in failed.items():
        metrics.count_failed(model, ErrorKind.BATCH_EXPIRED.value, None, n)
    return {"expired": expired, "finalized": finalize_now(store, None, now)}


def finalize_now(store: Store, batch_ids: list[str] | None, now: float | None = None) -> list[str]:
    """Close the finished batches among ``batch_ids`` (every batch: None). Besides beat's
    pass, a worker calls this after a write-back, so a finished batch reads ``completed`` at
    once rather than at beat's next finalize tick (up to ``claim_interval_ms`` later). A no-op
    for batches still running."""
    cancelled: dict[str, int] = {}
    finalized = store.finalize_batches(
        time.time() if now is None else now, only=batch_ids, cancelled=cancelled
    )
    for batch_id in finalized:
        log.info("batch %s finalized", batch_id)
    if cancelled:
        metrics.count_cancelled(len(cancelled), sum(cancelled.values()))
    return finalized


def reap(store: Store, settings: Settings, now: float | None = None) -> int:
    """Return orphaned claims to pending so they run again (invariant 3); a request taken
    back from a dead or silent worker's ``processing`` counts an attempt (``task_terminated``)
    and fails once ``max_retries`` are spent.

    The stale-heartbeat rule is applied only once this process has itself reached the
    database for a whole stale threshold (``workers.db_reachable_for``): after a database
    outage every worker's heartbeat is old, and a reaper that ran before the live workers
    had beaten again took their running requests and sent them a second time."""
    now = time.time() if now is None else now
    stale_s = settings.stale_worker_threshold_ms / 1000.0
    stale_rule = workers.db_reachable_for() >= stale_s
    if not stale_rule:
        log.info("stale-worker rule paused: this process reached the database only just now")
    failed: dict[str, int] = {}
    n = store.reap(
        now,
        settings.claim_timeout_ms / 1000.0,
        settings.processing_timeout_ms / 1000.0,
        stale_worker_s=stale_s if stale_rule else None,
        limit=settings.unclaim_batch_size,
        max_retries=settings.max_retries,
        retry_delay_s=backoff_s(0, settings),
        failed_by_model=failed,
    )
    for model, spent in failed.items():
        metrics.count_failed(model, ErrorKind.TASK_TERMINATED.value, None, spent)
    if n:
        log.warning("reaped %d orphaned requests (back to pending, or failed task_terminated)", n)
    return n


def purge(
    store: Store, settings: Settings, sleep: Callable[[float], None] = time.sleep
) -> list[tuple[float, int]]:
    """Erase requests and templates of soft-deleted batches and files, in chunks of
    ``purge_batch_size`` with ``purge_throttle_ms`` between chunks, so a large erasure never
    becomes one long transaction or a sustained load. Returns (time, rows) per chunk."""
    chunks: list[tuple[float, int]] = []
    while True:
        n = store.purge_chunk(settings.purge_batch_size)
        if n == 0:
            break
        chunks.append((time.time(), n))
        metrics.count_purged(n)
        sleep(settings.purge_throttle_ms / 1000.0)
    if chunks:
        log.info("purged %d rows in %d chunks", sum(n for _, n in chunks), len(chunks))
    return chunks
