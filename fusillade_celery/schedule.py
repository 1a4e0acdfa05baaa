"""Every periodic task, registered in one function with its cadence and expiry.

Each entry carries ``expires`` equal to its interval: if beat runs while no worker consumes the
control queue, stale ticks expire instead of piling up and firing all at once later.
"""

from __future__ import annotations

from typing import Any

from .queues import CONTROL_QUEUE
from .settings import Settings


def _every(task: str, seconds: float) -> dict[str, Any]:
    return {
        "task": task,
        "schedule": seconds,
        "options": {"queue": CONTROL_QUEUE, "expires": max(seconds, 1.0)},
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    claim_s = settings.claim_interval_ms / 1000.0
    entries = {
        # Claimer: moves pending rows into model queues; also runs on submit and on slot release.
        "fusillade-claim": _every("fusillade.claim", claim_s),
        # Finalize + expire: closing timestamps, output files, batch_expired failures.
        "fusillade-finalize": _every(
            "fusillade.finalize", min(claim_s, settings.cancellation_poll_interval_ms / 1000.0)
        ),
        # Reaper: orphaned claims back to pending; a quarter of the shorter of the claim
        # timeout and the stale-worker threshold keeps recovery under 1.25 x that threshold.
        "fusillade-reap": _every(
            "fusillade.reap",
            min(
                max(
                    min(settings.claim_timeout_ms, settings.stale_worker_threshold_ms) / 4000.0, 1.0
                ),
                15.0,
            ),
        ),
    }
    if settings.purge_interval_ms > 0:
        # Purge: erase requests/templates of soft-deleted batches and files, chunked.
        entries["fusillade-purge"] = _every("fusillade.purge", settings.purge_interval_ms / 1000.0)
    return entries
