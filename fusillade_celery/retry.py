"""Retry policy as pure functions (docs/architecture.md section 5), unit-tested on their own."""

from __future__ import annotations

import math

from .settings import Settings


def backoff_s(attempt: int, settings: Settings) -> float:
    """``min(backoff_ms * backoff_factor ** attempt, max_backoff_ms)``, in seconds. A float
    power overflows long before a retry budget runs out (2.0 ** 1024, 3.0 ** 647 with the
    default 1,000 retries), and the cap is what such a delay is anyway."""
    try:
        grown = settings.backoff_ms * settings.backoff_factor**attempt
    except OverflowError:
        grown = math.inf
    return max(min(grown, settings.max_backoff_ms), 0) / 1000.0


def retry_delay(attempt: int, now: float, deadline: float, settings: Settings) -> float | None:
    """Seconds to wait before retrying a request that has had ``attempt`` retries, or None
    when the retry is denied: the retry budget is spent, or the retry would fall at or after
    ``deadline - stop_before_deadline`` (a negative setting extends past the deadline)."""
    if attempt >= settings.max_retries:
        return None
    delay = backoff_s(attempt, settings)
    if now + delay >= deadline - settings.stop_before_deadline_ms / 1000.0:
        return None
    return delay


def expiry_grace_s(settings: Settings) -> float:
    """How long after ``expires_at`` a batch is expired: retries may run until then."""
    return max(0.0, -settings.stop_before_deadline_ms / 1000.0)
