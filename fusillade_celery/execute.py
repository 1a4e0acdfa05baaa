"""The execute path: one message's requests, from ``processing`` to a written outcome, and the
requests its freed slots are handed to.

Plain functions, called by the Celery task in ``tasks.py`` (which only adds delivery and
retry publishing), so the logic is tested without a broker.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import requests
from sqlalchemy.exc import DBAPIError

from . import failures, live, metrics, processors, upstream
from .cancel_watch import Aborted, Attempts, CancelWatch, Job
from .live import LiveConfig
from .retry import retry_delay
from .settings import Settings
from .states import RequestState
from .store import (
    Finish,
    HandOff,
    Store,
    WorkItem,
    Written,
    new_token,
    retry_while_unreachable,
    unreachable,
)

log = logging.getLogger(__name__)

#: Longest a finished attempt waits for others to share its write-back (a chunk closes sooner
#: when the attempts sent with its results are all in, or no result came for
#: ``Attempts.LINGER_S``). Since write-backs hand their slots on, this wait is time the slot
#: idles: 0.05 s rather than 0.15 s was as fast on an instant upstream and no slower at 1 s
#: latency (benchmark "instant", "latency").
FLUSH_S = 0.05

#: schedule_retry(token, request_ids, countdown_seconds, batch_ids): publish them again after
#: the delay (the batch ids go into the message for Flower).
ScheduleRetry = Callable[[str, list[int], float, list[str]], None]


@dataclass
class Report:
    """What one message did; logged, and returned by the task for tests and Flower."""

    started: int = 0
    #: Completed, failed and retrying count what was written; ``stale`` the ids skipped at
    #: start and the results a row no longer awaited (reaped, cancelled, expired meanwhile).
    completed: int = 0
    failed: int = 0
    retrying: int = 0
    stale: int = 0
    aborted: int = 0
    #: Requests started in slots this message's write-backs freed (``HandOffPolicy``).
    handed_off: int = 0
    retries: dict[float, list[int]] = field(default_factory=dict)
    #: Batches of every request it ran (handed-off ones too): the task's result in Flower.
    batch_ids: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class HandOffPolicy:
    """When a write-back hands the slots it frees to the next pending requests of the same
    model, which this message then runs (``Store.finish``): until ``until`` (epoch seconds;
    the task's hand-off window, so a message does not run for ever and the model's slots are
    re-spread over the workers once per window), while ``active()`` holds (false once the
    worker is shutting down), and only while no other attempt of this process waits for a
    ``-c`` slot (then the slot is theirs). Never for a model that has an SLA escalation or
    is one: which rows are urgent, and whose slot they take, is the claimer's decision (a
    hand-off skipping urgent rows would keep the slots they could have had busy with later
    ones).

    Nor once the model's live limit is below what it was when the message began
    (``started_with``): a hand-off keeps the in-flight count where it is, so a lowered limit
    is reached only if the messages that began under the old one stop handing off and drain.
    Messages claimed after the change hand off freely: the claim already kept them within
    the new limit, and a hand-off replaces a slot one for one."""

    until: float
    worker_id: str
    active: Callable[[], bool] = lambda: True
    started_with: LiveConfig | None = None

    def target(
        self, config: LiveConfig, settings: Settings, model: str, now: float, watch: CancelWatch
    ) -> HandOff | None:
        if now >= self.until or not self.active() or watch.others_waiting():
            return None
        if config.escalating(model):
            return None
        limit = config.limit_for(model)
        if limit <= 0 or (
            self.started_with is not None and limit < self.started_with.limit_for(model)
        ):
            return None
        return HandOff(
            model, self.worker_id, settings.stop_before_deadline_ms / 1000.0, token=new_token()
        )


def decide(item: WorkItem, outcome: upstream.Outcome, now: float, settings: Settings) -> Finish:
    """The write-back for one attempt: completed, failed, or retrying with its due time."""
    if outcome.ok:
        return Finish(item.id, item.token, RequestState.COMPLETED, outcome.status, outcome.body)
    assert outcome.kind is not None
    error = outcome.error()
    if outcome.kind.retriable:
        delay = retry_delay(item.attempt, now, item.deadline, settings)
        if delay is not None:
            return Finish(
                item.id,
                item.token,
                RequestState.RETRYING,
                outcome.status,
                outcome.body,
                error,
                not_before=now + delay,
            )
        error["retries_exhausted"] = True
        error["attempts"] = item.attempt + 1
    return Finish(item.id, item.token, RequestState.FAILED, outcome.status, outcome.body, error)


def _write(
    store: Store,
    finishes: list[Finish],
    now: float,
    target: HandOff | None,
    patience_s: float = 0.0,
) -> Written:
    """Write a chunk back (``Store.finish``). A hand-off that fails (a deadlock, a
    serialization error) is not worth the chunk's results: they are written again without
    it. While the database is unreachable (a restart, a failover, a network cut), the
    write-back is retried for up to ``patience_s`` (the processing timeout: until then no
    reaper takes the rows back): the upstream has answered and may have charged for it, and
    a result dropped here would be paid for again when the row is reclaimed and resent. It is
    retried with the same hand-off (its token), so the requests a statement whose reply was
    lost had started are found (``Store.finish``)."""
    try:
        return store.finish(finishes, now, target)
    except DBAPIError as exc:
        if not unreachable(exc):
            if target is None:
                raise
            log.warning("write-back with hand-off failed (%s); writing back without it", exc.orig)
            return store.finish(finishes, now)
    return retry_while_unreachable(
        lambda: store.finish(finishes, now, target),
        patience_s,
        f"write-back of {len(finishes)} results",
    )


def _written(store: Store, finishes: list[Finish], written: Written) -> list[Finish]:
    """The results the write-back wrote: all of them, unless some rows were taken from this
    message meanwhile (then ``Store.holding`` tells which). Only the report and the retries
    depend on it, so a database error here costs the exact count, not the message."""
    if written.changed >= len(finishes):
        return finishes
    try:
        return store.holding(finishes)
    except DBAPIError as exc:
        log.warning("could not tell which results were stale (%s); counting them all", exc.orig)
        return finishes


def _count_and_retry(
    finishes: list[Finish],
    now: float,
    report: Report,
    schedule_retry: ScheduleRetry,
    items: Mapping[Hashable, WorkItem],
) -> None:
    """Count a written chunk (the report, and this process's metrics: only what the write-back
    wrote, so a stale result is not counted) and schedule its retries, grouped by token and
    delay. ``items`` holds each result's attempt by (id, token)."""
    retries: dict[tuple[str, float], list[int]] = {}
    retry_batches: dict[tuple[str, float], set[str]] = {}  # named in the retry messages
    # Tallied here, counted once per chunk: a locked increment per request and metric cost
    # more than the dict updates.
    completed: dict[str, int] = {}
    failed: dict[tuple[str, str | None, int | None], int] = {}
    retried: list[int] = []  # retries before each completion
    late = 0
    for f in finishes:
        if f.state is RequestState.COMPLETED:
            report.completed += 1
            item = items[f.id, f.token]
            completed[item.routed_model] = completed.get(item.routed_model, 0) + 1
            retried.append(item.attempt)
            late += now > item.deadline
        elif f.state is RequestState.FAILED:
            report.failed += 1
            key = (items[f.id, f.token].routed_model, (f.error or {}).get("kind"), f.status)
            failed[key] = failed.get(key, 0) + 1
        else:
            assert f.not_before is not None
            report.retrying += 1
            retry = (f.token, round(max(f.not_before - now, 0.0), 3))
            retries.setdefault(retry, []).append(f.id)
            retry_batches.setdefault(retry, set()).add(items[f.id, f.token].batch_id)
    metrics.count_written(completed, failed, retried, late)
    for (token, delay), retry_ids in retries.items():
        report.retries.setdefault(delay, []).extend(retry_ids)
        try:
            schedule_retry(token, retry_ids, delay, sorted(retry_batches[token, delay]))
        except Exception as exc:  # noqa: BLE001 - the broker may be away; the rows are safe
            # They are ``retrying`` in the database: the reaper takes them back to pending
            # once overdue by claim_timeout_ms, so nothing is lost, only delayed.
            log.warning(
                "could not schedule %d retries (%s); left to the reaper", len(retry_ids), exc
            )


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
    hand_off: HandOffPolicy | None = None,
) -> Report:
    """Start the rows still holding ``token``, attempt them, write back in batched, fenced
    chunks as they finish (at most ``FLUSH_S`` apart), and schedule retries grouped by delay.
    Stale ids (reclaimed, cancelled, done) are skipped; attempts of a batch cancelled meanwhile
    are aborted under gevent (the row is already ``canceled``: nothing to write).

    With ``hand_off``, each write-back gives the slots it frees to the next pending requests
    of the model in the same statement, and they run here at once, without a claim, a broker
    hop or a start statement (``Store.finish``). ``requests_ended(models, batch_ids)`` is
    called after each write-back that freed slots it did not hand on, so they are claimed
    again while the slower requests of this message still run, and with the batches that may
    have just ended, so a batch whose last request just ended is closed at once; it must
    return at once (the task's version only wakes a background runner, ``claimer.Refill``)."""
    report = Report()
    # Before the statement: a silence that began after it committed must still be noticed
    # (``CancelWatch._lost``).
    started_mono = time.monotonic()
    items = store.start(ids, token, worker_id, time.time())
    report.started = len(items)
    report.stale = len(ids) - len(items)
    if watch is None:
        watch = CancelWatch(store, poll_s=settings.cancellation_poll_interval_ms / 1000.0)
    # Keyed by (id, token), not id: a row reaped while its attempt still runs here may be
    # handed back to this very message under a new token; both attempts are then its own.
    running: dict[Hashable, WorkItem] = {}
    dispatch = processors.dispatcher(settings, watch)  # the processor of each request's path

    def jobs(new: Iterable[WorkItem]) -> list[Job[upstream.Outcome]]:
        out: list[Job[upstream.Outcome]] = []
        held: dict[str, int] = {}
        for item in new:
            running[item.id, item.token] = item
            report.batch_ids.add(item.batch_id)
            held[item.routed_model] = held.get(item.routed_model, 0) + 1
            attempt = functools.partial(
                metrics.timed, item.routed_model, dispatch, session, item, settings
            )
            out.append(((item.id, item.token), item.batch_id, attempt))
        metrics.add_in_flight(held)
        return out

    attempts: Attempts[upstream.Outcome] = watch.attempts(FLUSH_S)
    with attempts, _left_in_flight(running):
        attempts.add(jobs(items), created=started_mono)
        for chunk in attempts:
            finishes = []
            decided: dict[Hashable, WorkItem] = {}  # the attempt of each result, for counting
            ended: list[WorkItem] = []  # aborted (already canceled) or written terminal
            freeing = 0  # rows this write-back moves out of the model's slots
            left: dict[str, int] = {}  # requests no longer in flight here, per model
            for key, outcome, finished_at in chunk:
                item = running.pop(key)
                left[item.routed_model] = left.get(item.routed_model, 0) + 1
                if isinstance(outcome, Aborted):
                    report.aborted += 1  # the row is canceled already: nothing to write
                    ended.append(item)
                    continue
                finish = decide(item, outcome, finished_at, settings)
                finishes.append(finish)
                decided[key] = item
                if not outcome.ok:  # counted in memory; a write or a line now and then
                    failures.FAILURES.note(store, settings, item, outcome, finished_at)
                if finish.state is not RequestState.RETRYING:
                    ended.append(item)
                    freeing += 1
            metrics.add_in_flight(left, -1)
            started: list[WorkItem] = []
            if finishes:
                now = time.time()
                written_mono = time.monotonic()
                target = None
                if hand_off is not None and freeing:
                    # A message's rows, and the rows handed to it, share one routed model.
                    config = live.current(store, settings)
                    target = hand_off.target(config, settings, ended[-1].routed_model, now, watch)
                written = _write(
                    store, finishes, now, target, settings.processing_timeout_ms / 1000.0
                )
                started = written.started
                attempts.add(jobs(started), created=written_mono)  # first: nothing may strand them
                report.handed_off += len(started)
                done = _written(store, finishes, written)
                report.stale += len(finishes) - len(done)
                _count_and_retry(done, now, report, schedule_retry, decided)
            if requests_ended is not None and ended:
                _report_ended(requests_ended, ended, started)
    return report


@contextmanager
def _left_in_flight(running: Mapping[Hashable, WorkItem]) -> Iterator[None]:
    """On the way out, the attempts still ``running`` (abandoned: an error ended the message)
    leave this process's in-flight count."""
    try:
        yield
    finally:
        left: dict[str, int] = {}
        for item in running.values():
            left[item.routed_model] = left.get(item.routed_model, 0) + 1
        metrics.add_in_flight(left, -1)


def _report_ended(
    requests_ended: Callable[[set[str], set[str]], None],
    ended: list[WorkItem],
    started: list[WorkItem],
) -> None:
    """Slots freed and not handed on are refilled; batches of ended rows may be finished
    (those a hand-off just started rows of are not)."""
    if len(started) < len(ended):
        requests_ended({i.model for i in ended}, {i.batch_id for i in ended})
        return
    maybe_done = {i.batch_id for i in ended} - {i.batch_id for i in started}
    if maybe_done:
        requests_ended({i.model for i in ended if i.batch_id in maybe_done}, maybe_done)
