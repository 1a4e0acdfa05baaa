"""The execute path: one message's requests, from ``processing`` to a written outcome.

Plain functions, called by the Celery task in ``tasks.py`` (which only adds delivery and
retry publishing), so the logic is tested without a broker.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import requests

from . import upstream
from .cancel_watch import Aborted, CancelWatch
from .retry import retry_delay
from .settings import Settings
from .states import RequestState
from .store import Finish, Store, WorkItem

log = logging.getLogger(__name__)

#: schedule_retry(request_ids, countdown_seconds): publish them again after the delay.
ScheduleRetry = Callable[[list[int], float], None]


@dataclass
class Report:
    """What one message did; logged, and returned by the task for tests and Flower."""

    started: int = 0
    completed: int = 0
    failed: int = 0
    retrying: int = 0
    stale: int = 0
    aborted: int = 0
    models: set[str] = field(default_factory=set)
    retries: dict[float, list[int]] = field(default_factory=dict)


def decide(item: WorkItem, outcome: upstream.Outcome, now: float, settings: Settings) -> Finish:
    """The write-back for one attempt: completed, failed, or retrying with its due time."""
    if outcome.ok:
        return Finish(item.id, RequestState.COMPLETED, outcome.status, outcome.body)
    assert outcome.kind is not None
    error = outcome.error()
    if outcome.kind.retriable:
        delay = retry_delay(item.attempt, now, item.deadline, settings)
        if delay is not None:
            return Finish(
                item.id,
                RequestState.RETRYING,
                outcome.status,
                outcome.body,
                error,
                not_before=now + delay,
            )
        error["retries_exhausted"] = True
        error["attempts"] = item.attempt + 1
    return Finish(item.id, RequestState.FAILED, outcome.status, outcome.body, error)


def execute(
    store: Store,
    settings: Settings,
    session: requests.Session,
    token: str,
    ids: Sequence[int],
    worker_id: str,
    schedule_retry: ScheduleRetry,
    watch: CancelWatch | None = None,
) -> Report:
    """Start the rows still holding ``token``, attempt each, write back in one batch, and
    schedule retries grouped by delay. Stale ids (reclaimed, cancelled, done) are skipped;
    with a ``watch``, attempts of a batch cancelled meanwhile are aborted (the row is already
    ``canceled``, so there is nothing to write)."""
    report = Report()
    items = store.start(ids, token, worker_id, time.time())
    report.started = len(items)
    report.stale = len(ids) - len(items)
    report.models = {item.model for item in items}
    finishes = []
    for item in items:
        try:
            if watch is None:
                outcome = upstream.attempt(session, item, settings)
            else:
                outcome = watch.run(
                    item.id,
                    item.batch_id,
                    functools.partial(upstream.attempt, session, item, settings),
                )
        except Aborted:
            report.aborted += 1
            continue
        finishes.append(decide(item, outcome, time.time(), settings))
    if not finishes:
        return report
    now = time.time()
    store.finish(finishes, token, now)
    for f in finishes:
        if f.state is RequestState.COMPLETED:
            report.completed += 1
        elif f.state is RequestState.FAILED:
            report.failed += 1
        else:
            assert f.not_before is not None
            report.retrying += 1
            delay = round(max(f.not_before - now, 0.0), 3)
            report.retries.setdefault(delay, []).append(f.id)
    for delay, retry_ids in report.retries.items():
        schedule_retry(retry_ids, delay)
    return report
