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

#: Longest a finished attempt waits for its message-mates before being written back. Each
#: write-back is a transaction and, when it ends requests, a refill claim and a new message:
#: at 1 s upstream latency, 0.15 s rather than 0.05 s cut the machine's CPU per request by
#: about 15 % (benchmark "latency"). A message whose attempts are all done is written at once.
FLUSH_S = 0.15

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


def _write_back(
    store: Store,
    token: str,
    finishes: list[Finish],
    report: Report,
    schedule_retry: ScheduleRetry,
) -> None:
    """One fenced batch write, then the retries of this chunk grouped by delay."""
    now = time.time()
    store.finish(finishes, token, now)
    retries: dict[float, list[int]] = {}
    for f in finishes:
        if f.state is RequestState.COMPLETED:
            report.completed += 1
        elif f.state is RequestState.FAILED:
            report.failed += 1
        else:
            assert f.not_before is not None
            report.retrying += 1
            retries.setdefault(round(max(f.not_before - now, 0.0), 3), []).append(f.id)
    for delay, retry_ids in retries.items():
        report.retries.setdefault(delay, []).extend(retry_ids)
        schedule_retry(retry_ids, delay)


def execute(
    store: Store,
    settings: Settings,
    session: requests.Session,
    token: str,
    ids: Sequence[int],
    worker_id: str,
    schedule_retry: ScheduleRetry,
    watch: CancelWatch | None = None,
    requests_ended: Callable[[set[str], set[str]], None] | None = None,
) -> Report:
    """Start the rows still holding ``token``, attempt them, write back in batched, fenced
    chunks as they finish (at most ``FLUSH_S`` apart), and schedule retries grouped by delay.
    Stale ids (reclaimed, cancelled, done) are skipped; attempts of a batch cancelled meanwhile
    are aborted under gevent (the row is already ``canceled``: nothing to write).
    ``requests_ended(models, batch_ids)`` is called after each write-back that ended requests,
    so the models' freed slots are claimed again while the slower requests of this message
    still run, and a batch whose last request just ended is closed at once; it must return at
    once (the task's version only wakes a background runner, ``claimer.Refill``)."""
    report = Report()
    items = store.start(ids, token, worker_id, time.time())
    report.started = len(items)
    report.stale = len(ids) - len(items)
    if watch is None:
        watch = CancelWatch(store, poll_s=settings.cancellation_poll_interval_ms / 1000.0)
    by_id = {item.id: item for item in items}
    jobs = [
        (item.id, item.batch_id, functools.partial(upstream.attempt, session, item, settings))
        for item in items
    ]
    for chunk in watch.run_iter(jobs, FLUSH_S):
        finishes = []
        ended: list[WorkItem] = []  # aborted (already canceled) or written terminal
        for key, outcome, finished_at in chunk:
            if isinstance(outcome, Aborted):
                report.aborted += 1  # the row is canceled already: nothing to write
                ended.append(by_id[key])
                continue
            finish = decide(by_id[key], outcome, finished_at, settings)
            finishes.append(finish)
            if finish.state is not RequestState.RETRYING:
                ended.append(by_id[key])
        if finishes:
            _write_back(store, token, finishes, report, schedule_retry)
        if requests_ended is not None and ended:
            requests_ended({i.model for i in ended}, {i.batch_id for i in ended})
    return report
