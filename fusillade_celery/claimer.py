"""The claim path: pending rows -> claimed -> execute messages on ``model.<name>`` queues.

Runs on beat's schedule, right after a submit, and in a worker whenever a write-back frees
slots (``Refill``, in the background of the worker process). Capacity is counted in the
database, so the limit holds across every worker on every machine; queues carry ids and
tokens, never state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from .settings import Settings
from .store import Claimed, Store

log = logging.getLogger(__name__)

#: publish(routed_model, token, request_ids) -> None. One call per claim statement; the
#: implementation splits it into messages and publishes them over one broker connection.
Publish = Callable[[str, str, Sequence[int]], None]


def chunked(ids: Sequence[int], size: int) -> list[list[int]]:
    size = max(1, size)
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def claim_model(
    store: Store, settings: Settings, publish: Publish, model: str, now: float | None = None
) -> int:
    """Claim and dispatch what ``model``'s limit allows; returns how many were claimed.

    SLA escalation comes first: rows whose batch has less than the threshold left go to the
    escalation model's queue under that model's limit, and ``routed_model`` records it."""
    now = time.time() if now is None else now
    total = 0
    escalation = settings.escalations.get(model)
    if escalation is not None:
        total += _claim_into(
            store,
            settings,
            publish,
            model,
            escalation.model,
            now,
            deadline_before=now + escalation.threshold_s,
        )
    total += _claim_into(store, settings, publish, model, model, now)
    return total


def _claim_into(
    store: Store,
    settings: Settings,
    publish: Publish,
    model: str,
    routed: str,
    now: float,
    deadline_before: float | None = None,
) -> int:
    token, rows = store.claim(
        model,
        routed,
        limit=settings.limit_for(routed),
        batch_size=settings.claim_batch_size,
        now=now,
        deadline_before=deadline_before,
    )
    if not rows:
        return 0
    publish(routed, token, [c.id for c in rows])
    log.debug("claimed %d of %s for queue of %s", len(rows), model, routed)
    return len(rows)


def claim_all(store: Store, settings: Settings, publish: Publish) -> dict[str, int]:
    """One claimer run over every model with running batches."""
    now = time.time()
    return {m: claim_model(store, settings, publish, m, now) for m in sorted(store.active_models())}


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

    def __init__(self, what: str = "refill claim") -> None:
        self.what = what  # for the log
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
                log.warning("%s for %s failed (%s); left to beat", self.what, model, exc)

    def idle(self) -> bool:
        """No refill running or asked for (tests)."""
        with self._lock:
            return not self._running and not self._wanted


__all__ = ["Claimed", "Publish", "Refill", "chunked", "claim_all", "claim_model"]
