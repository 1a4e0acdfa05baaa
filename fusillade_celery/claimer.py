"""The claim path: pending rows -> claimed -> execute messages on ``model.<name>`` queues.

Runs on beat's schedule, right after a submit, and in a worker whenever a write-back frees
slots (``Refill``, in the background of the worker process). Capacity is counted in the
database, so the limit holds across every worker on every machine; queues carry ids and
tokens, never state.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

from sqlalchemy import Engine

from . import live, metrics
from .settings import Settings
from .store import Claimed, Store

log = logging.getLogger(__name__)

#: publish(routed_model, token, request_ids, batch_ids) -> None, with the batch of each
#: request in order (for Flower). One call per claim statement; the implementation splits it
#: into messages and publishes them over one broker connection.
Publish = Callable[[str, str, Sequence[int], Sequence[str]], None]
#: consumed(routed_model) -> whether a live worker consumes the model's queue.
Consumed = Callable[[str], bool]


def split(ids: Sequence[int], most: int) -> list[list[int]]:
    """``ids`` in the fewest near-equal messages of at most ``most`` each.

    The fewest, not one per consumer: every message costs a broker round trip, task events,
    a start and a finish transaction and a refill claim, and refill claims are small (about 40
    rows at 1 s upstream latency). Giving each consumer a share of every claim doubled the
    messages there and cost the workers 45 % more CPU per request (benchmark "latency"), with
    instant upstreams no faster. Consecutive claims spread over the workers anyway: each
    message goes to whichever consumer asks first."""
    n = len(ids)
    if n == 0:
        return []
    count = math.ceil(n / max(1, most))
    base, extra = divmod(n, count)
    out, at = [], 0
    for k in range(count):
        size = base + (1 if k < extra else 0)
        out.append(list(ids[at : at + size]))
        at += size
    return out


#: Requests per message when the queue's consumers do not advertise their -c (not yet
#: registered, or an older worker): small enough for any sensible -c.
UNKNOWN_CONCURRENCY_CAP = 16


class MessageSizer:
    """How a claim of one queue is cut into execute messages.

    A message runs on one worker, whose ``-c`` bounds how many of its requests are in flight
    at once: requests beyond it wait in that worker while another may idle. So a message
    carries at most ``requests_per_message`` and at most the smallest ``-c`` among the
    queue's live consumers, which every worker advertises in its heartbeat row. Fewer, larger
    messages are what make instant upstreams fast (``split``). The consumer list is read at
    most once per heartbeat interval per process: the rows it reads change no faster."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[Engine, str], tuple[float, list[int | None]]] = {}
        #: Set while this process is the only worker (embedded mode): its -c and its queues,
        #: no lookup.
        self.only_consumer: int | None = None
        self.only_queues: frozenset[str] = frozenset()

    def split(
        self, store: Store, settings: Settings, queue: str, ids: Sequence[int]
    ) -> list[list[int]]:
        consumers = self.consumers(store, settings, queue)
        known = [c for c in consumers if c is not None]
        fits = min(known) if known and len(known) == len(consumers) else UNKNOWN_CONCURRENCY_CAP
        return split(ids, min(settings.requests_per_message, fits))

    def consumed(self, store: Store, settings: Settings, queue: str) -> bool:
        """Whether a live worker consumes ``queue`` (its heartbeat row names it)."""
        return bool(self.consumers(store, settings, queue))

    def consumers(self, store: Store, settings: Settings, queue: str) -> list[int | None]:
        if self.only_consumer is not None:
            return [self.only_consumer] if queue in self.only_queues else []
        now = time.time()
        key = (store.engine, queue)  # one engine per database and process (db.get_engine)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            found = store.consumer_concurrency(
                queue, now - settings.stale_worker_threshold_ms / 1000.0
            )
        except Exception as exc:  # noqa: BLE001 - sizing falls back; the claim must go out
            log.warning("could not read the consumers of %s (%s)", queue, exc)
            found = [None]  # one consumer of unknown -c: messages small, the claim goes out
        with self._lock:
            self._cache[key] = (now + settings.heartbeat_interval_ms / 1000.0, found)
        return found


def claim_model(
    store: Store,
    settings: Settings,
    publish: Publish,
    model: str,
    now: float | None = None,
    consumed: Consumed | None = None,
) -> int:
    """Claim and dispatch what ``model``'s limit allows; returns how many were claimed.

    SLA escalation comes first: rows whose batch has less than the threshold left go to the
    escalation model's queue under that model's limit, and ``routed_model`` records it.
    Limits and escalations are the live ones (``live.current``): a change made with
    ``fusillade-celery limits set`` is used from the next claim interval on.

    With ``consumed``, nothing is claimed for a queue that no live worker consumes: its
    messages would only wait there, and each claim timeout the reaper would take the rows
    back and the next claim publish them again, so the queue grew for ever (about 1,400
    messages a day) while the batch read ``in_progress 0/0``. Its rows stay pending (the
    batch still expires on time) and are claimed as soon as a worker for the queue starts."""
    now = time.time() if now is None else now
    total = 0
    config = live.current(store, settings)
    escalation = config.escalations.get(model)
    if escalation is not None and _consumed(consumed, escalation.model):
        total += _claim_into(
            store,
            settings,
            publish,
            model,
            escalation.model,
            now,
            config.limit_for(escalation.model),
            deadline_before=now + escalation.threshold_s,
        )
    if _consumed(consumed, model):
        total += _claim_into(store, settings, publish, model, model, now, config.limit_for(model))
    return total


#: routed model -> when (monotonic) this process last warned that nobody consumes its queue.
_UNCONSUMED_WARNED: dict[str, float] = {}
UNCONSUMED_WARN_EVERY_S = 60.0


def _consumed(consumed: Consumed | None, routed: str) -> bool:
    if consumed is None or consumed(routed):
        return True
    last = _UNCONSUMED_WARNED.get(routed)
    if last is None or time.monotonic() - last >= UNCONSUMED_WARN_EVERY_S:
        _UNCONSUMED_WARNED[routed] = time.monotonic()
        log.warning(
            "no live worker consumes model.%s: its requests stay pending (start one with "
            "`celery -A fusillade_celery worker -Q model.%s`)",
            routed,
            routed,
        )
    return False


def _claim_into(
    store: Store,
    settings: Settings,
    publish: Publish,
    model: str,
    routed: str,
    now: float,
    limit: int,
    deadline_before: float | None = None,
) -> int:
    if limit <= 0:  # paused (``limits set model=0``): in-flight requests finish, none start
        return 0
    started = time.perf_counter()
    token, rows = store.claim(
        model,
        routed,
        limit=limit,
        batch_size=settings.claim_batch_size,
        now=now,
        deadline_before=deadline_before,
        stop_before_s=settings.stop_before_deadline_ms / 1000.0,
    )
    metrics.count_claim(model, routed, limit, len(rows), time.perf_counter() - started)
    if not rows:
        return 0
    publish(routed, token, [c.id for c in rows], [c.batch_id for c in rows])
    log.debug("claimed %d of %s for queue of %s", len(rows), model, routed)
    return len(rows)


def claim_all(
    store: Store, settings: Settings, publish: Publish, consumed: Consumed | None = None
) -> dict[str, int]:
    """One claimer run over every model with running batches."""
    now = time.time()
    return {
        m: claim_model(store, settings, publish, m, now, consumed)
        for m in sorted(store.active_models())
    }


class Refill:
    """Slot-release refills of one process: coalesced per model, run in the background.

    Every write-back that frees slots asks for a claim. Run one per request and a busy worker
    spends its time counting in-flight rows and queueing on the claim lock; skip the ones that
    find a claim already running and the slots they freed wait for beat's next tick; run them
    inline and a message's own write-backs wait behind other messages' claims. So ``request``
    never blocks: it wakes one background runner per model (a greenlet under gevent), which
    claims until no request arrived during its last claim. Each claim sees every slot freed
    before it started; a failed claim is logged and left to the next request or beat's tick.
    The latest request's callable is the one run (it carries the freshest context)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wanted: dict[str, Callable[[], object]] = {}  # model -> latest claim to run
        self._running: set[str] = set()

    def request(self, model: str, run: Callable[[], object]) -> None:
        with self._lock:
            self._wanted[model] = run
            if model in self._running:
                return
            self._running.add(model)
        threading.Thread(
            target=self._loop, args=(model,), name=f"fusillade-refill-{model}", daemon=True
        ).start()

    def _loop(self, model: str) -> None:
        while True:
            with self._lock:
                run = self._wanted.pop(model, None)
                if run is None:
                    self._running.discard(model)
                    return
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - beat's tick redoes what this missed
                log.warning("refill claim for %s failed (%s); left to beat", model, exc)

    def idle(self) -> bool:
        """No refill running or asked for (tests)."""
        with self._lock:
            return not self._running and not self._wanted


__all__ = [
    "Claimed",
    "Consumed",
    "MessageSizer",
    "Publish",
    "Refill",
    "claim_all",
    "claim_model",
    "split",
]
