"""Periodic housekeeping (DESIGN.md section 6): finalize, expire, reap.

Each function is one pass, safe to run concurrently with itself and with workers: every
statement it issues is conditional on the state it expects.
"""

from __future__ import annotations

import logging
import time

from .retry import expiry_grace_s
from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)


def finalize(store: Store, settings: Settings, now: float | None = None) -> dict[str, list[str]]:
    """Expire overdue batches, then close the ones whose requests are all terminal."""
    now = time.time() if now is None else now
    expired = store.expire_batches(now, expiry_grace_s(settings))
    finalized = store.finalize_batches(now)
    for batch_id in expired:
        log.info("batch %s expired", batch_id)
    for batch_id in finalized:
        log.info("batch %s finalized", batch_id)
    return {"expired": expired, "finalized": finalized}


def reap(store: Store, settings: Settings, now: float | None = None) -> int:
    """Return orphaned claims to pending so they run again (invariant 3)."""
    now = time.time() if now is None else now
    n = store.reap(now, settings.claim_timeout_ms / 1000.0, settings.processing_timeout_ms / 1000.0)
    if n:
        log.warning("reaped %d orphaned requests back to pending", n)
    return n
