"""Celery tasks: delivery semantics, retries and publishing; the logic is elsewhere.

Messages carry ids and a claim token only, never a body or a key (invariant 8), so what Flower
and the broker show is safe to show. Execute messages name their batches too (the
``batch_ids`` keyword), so a batch's tasks can be found in Flower.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

from celery import Task, signals

from . import claimer, execute, failures, live, maintenance, upstream
from . import control as _control  # noqa: F401  (registers the cancel broadcast command)
from .app import app, get_settings, get_store
from .cancel_watch import get_watch
from .queues import direct_queue, queue_for_model
from .settings import Settings
from .store import Store
from .workers import worker_id

log = logging.getLogger(__name__)

#: This process's slot-release refills, one background runner per model (see claimer.Refill).
REFILL = claimer.Refill()
#: This process's view of each queue's consumers, for sizing execute messages.
SIZER = claimer.MessageSizer()
#: Whether messages of this process may hand their freed slots on (execute.HandOffPolicy).
#: Off once the worker begins its shutdown, so a warm shutdown (SIGTERM) ends with the
#: requests already running; off in prefork children, which Celery's shutdown signal does
#: not reach (prefork is not the I/O pool this engine is built for: use -P gevent or threads).
HAND_OFF = {"allowed": True}


@signals.worker_ready.connect
def _allow_hand_offs(**_: Any) -> None:
    HAND_OFF["allowed"] = True


@signals.worker_shutting_down.connect
@signals.worker_process_init.connect
def _stop_hand_offs(**_: Any) -> None:
    HAND_OFF["allowed"] = False


@signals.after_setup_logger.connect
def _show_failures(**_: Any) -> None:
    failures.worker_logging()


@signals.celeryd_init.connect
def _size_http_pool(options: dict[str, Any] | None = None, **_: Any) -> None:
    """One kept-alive upstream connection per concurrent task of this worker (``-c``)."""
    concurrency = (options or {}).get("concurrency")
    if concurrency:
        upstream.POOL_SIZE["size"] = max(int(concurrency), 1)


def publish_execute(
    routed_model: str, token: str, ids: Sequence[int], batch_ids: Sequence[str] = ()
) -> None:
    """Split a claim into messages (``claimer.MessageSizer``: sized to the queue's consumers)
    and publish them over one producer (one broker connection) to ``model.<routed_model>``.
    ``batch_ids`` (the batch of each id, in order) name each message's batches for Flower;
    a keyword of their own, so the ids' repr (which Celery cuts at 1 KiB) cannot hide them."""
    settings = get_settings()
    name = queue_for_model(routed_model)
    queue = direct_queue(name)
    chunks = SIZER.split(get_store(), settings, name, ids)
    batch_of = dict(zip(ids, batch_ids, strict=True)) if batch_ids else {}
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            batches = sorted({batch_of[i] for i in chunk}) if batch_of else []
            execute_requests.apply_async(
                args=(routed_model, token, chunk),
                kwargs={"batch_ids": batches},
                queue=queue,
                producer=producer,
            )


def consumed_in(store: Store, settings: Settings) -> claimer.Consumed:
    """Whether a live worker consumes a routed model's queue (``claimer.claim_model``); read
    from the workers table at most once per heartbeat interval per process."""
    return lambda routed_model: SIZER.consumed(store, settings, queue_for_model(routed_model))


def _refill(store: Store, settings: Settings, model: str, batch_ids: list[str]) -> None:
    """Claim the slots just freed. Nothing left to claim means the model's work is running
    out: then the batches whose requests just ended may be finished, and closing them now
    rather than at beat's next finalize tick (up to ``claim_interval_ms``) is what a caller
    polling for ``completed`` sees. While there is work to claim, no finalize query runs."""
    consumed = consumed_in(store, settings)
    if claimer.claim_model(store, settings, publish_execute, model, consumed=consumed) == 0:
        maintenance.finalize_now(store, batch_ids)


@app.task(
    name="fusillade.execute",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
    ignore_result=True,
)
def execute_requests(
    self: Task,
    routed_model: str,
    token: str,
    ids: list[int],
    batch_ids: list[str] | None = None,
) -> dict[str, Any]:
    """Run the requests of one message. Retries go out as countdown messages (one per
    distinct delay) on the same model queue with the same claim token. ``batch_ids`` is for
    Flower only (messages queued before it existed have none)."""
    settings = get_settings()
    store = get_store()
    wid = worker_id()

    def schedule_retry(
        retry_token: str, retry_ids: list[int], delay: float, retry_batches: list[str]
    ) -> None:
        # A countdown message on the same queue, same token, same task id (Flower shows one
        # task retried). Not ``self.retry``: in Celery 5.7 its re-published message was never
        # delivered in our tests, while the equivalent apply_async with countdown is.
        execute_requests.apply_async(
            args=(routed_model, retry_token, retry_ids),
            kwargs={"batch_ids": retry_batches},
            countdown=delay,
            queue=direct_queue(queue_for_model(routed_model)),
            task_id=self.request.id,
            retries=(self.request.retries or 0) + 1,
        )

    def requests_ended(models: set[str], batch_ids: set[str]) -> None:
        # Refill at once rather than at beat's next tick; coalesced per process and model.
        for model in models:
            REFILL.request(
                model, functools.partial(_refill, store, settings, model, sorted(batch_ids))
            )

    hand_off = None
    if settings.handoff_window_ms > 0:
        hand_off = execute.HandOffPolicy(
            until=time.time() + settings.handoff_window_ms / 1000.0,
            worker_id=wid,
            active=lambda: HAND_OFF["allowed"],
            started_with=live.current(store, settings),
        )
    report = execute.execute(
        store,
        settings,
        upstream.get_session(),
        token,
        ids,
        wid,
        schedule_retry,
        get_watch(
            store,
            settings.cancellation_poll_interval_ms / 1000.0,
            upstream.POOL_SIZE["size"],
            settings.processing_timeout_ms / 1000.0,
        ),
        requests_ended,
        hand_off,
    )
    return {
        "started": report.started,
        "completed": report.completed,
        "failed": report.failed,
        "retrying": report.retrying,
        "stale": report.stale,
        "aborted": report.aborted,
        "handed_off": report.handed_off,
        "batch_ids": sorted(report.batch_ids),
    }


@app.task(name="fusillade.claim", ignore_result=True, acks_late=True)
def claim(model: str | None = None) -> dict[str, int]:
    settings, store = get_settings(), get_store()
    consumed = consumed_in(store, settings)
    if model is not None:
        return {
            model: claimer.claim_model(store, settings, publish_execute, model, consumed=consumed)
        }
    return claimer.claim_all(store, settings, publish_execute, consumed)


@app.task(name="fusillade.finalize", ignore_result=True)
def finalize() -> dict[str, list[str]]:
    return maintenance.finalize(get_store(), get_settings())


@app.task(name="fusillade.reap", ignore_result=True)
def reap() -> int:
    return maintenance.reap(get_store(), get_settings())


@app.task(name="fusillade.purge", ignore_result=True)
def purge() -> int:
    return sum(n for _, n in maintenance.purge(get_store(), get_settings()))
