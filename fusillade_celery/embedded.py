"""Embedded mode: SQLite file, in-process broker, a Celery worker thread and the periodic work
in the calling thread. No servers to set up.

It runs the very same claimer, execute task and maintenance functions as the distributed mode;
only the engine (SQLite) and the broker (kombu's in-memory transport) differ. The state of record
is the SQLite file, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import worker as celery_worker
from celery.worker import state as worker_state

from . import claimer, live, maintenance, processors, upstream
from .app import IN_PROCESS_WORKER, app, configure, reset_broker_connections
from .live import LiveConfig
from .queues import CONTROL_QUEUE, direct_queue, queue_for_model
from .settings import MEMORY_BROKER, Settings
from .states import TERMINAL_BATCH, BatchStatus
from .submit import Client

log = logging.getLogger(__name__)
TICK_S = 0.2

Progress = Callable[[dict[str, Any]], None]


class EmbeddedWorker:
    """A Celery WorkController (threads pool) consuming the model queues in this process."""

    def __init__(self, queues: list[str], concurrency: int):
        self.queues = queues
        self.concurrency = concurrency
        self._thread: threading.Thread | None = None
        self._controller: Any = None

    def start(self) -> None:
        worker_state.should_terminate = None
        worker_state.should_stop = None
        IN_PROCESS_WORKER["starting"] = True  # not a `celery worker`: no broker check
        try:
            self._controller = celery_worker.WorkController(
                app=app,
                pool="threads",
                concurrency=self.concurrency,
                queues=self.queues,
                loglevel="WARNING",
                without_heartbeat=True,
                without_mingle=True,
                without_gossip=True,
                hostname="embedded@localhost",
            )
        finally:
            IN_PROCESS_WORKER["starting"] = False
        self._thread = threading.Thread(
            target=self._controller.start, name="fusillade-worker", daemon=True
        )
        self._thread.start()

    def stop(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Warm stop lets running messages finish (their results are written); a cold stop
        leaves them ``processing`` in the file, and the next run takes them back."""
        if self._thread is None:
            return
        if wait:
            worker_state.should_stop = 0
        else:
            worker_state.should_terminate = 0
        self._wake()
        self._thread.join(timeout)
        worker_state.should_stop = None
        worker_state.should_terminate = None

    def add_queues(self, queues: list[str]) -> None:
        """Consume ``queues`` too. Done by the worker's own thread between two drains, as
        Celery's ``add_consumer`` control command does it; woken at once."""
        consumer = self._controller.consumer
        for name in queues:
            consumer.call_soon(consumer.add_task_queue, name)
        self._wake()

    @staticmethod
    def _wake() -> None:
        """Celery's blocking loop drains the broker for up to 2 s per turn, and drains once
        more after it has seen the stop flag (in a ``finally``): on the in-memory transport
        those waits were most of a short run's shutdown. Two harmless messages (finalize
        passes) end the current drain and that last one at once."""
        from .tasks import finalize

        try:
            for _ in range(2):
                finalize.apply_async(queue=direct_queue(CONTROL_QUEUE))
        except Exception as exc:  # noqa: BLE001 - without it the stop only takes longer
            log.debug("could not wake the embedded worker: %s", exc)


def embedded_settings(settings: Settings) -> Settings:
    """The settings with the in-process broker (and nothing else changed)."""
    return settings.replace(broker_url=MEMORY_BROKER)


def _with_escalations(models: list[str], config: LiveConfig) -> set[str]:
    esc = config.escalations
    return set(models) | {esc[m].model for m in models if m in esc}


def queues_for(models: list[str], config: LiveConfig) -> list[str]:
    """The control queue and the queues of the batch's models and their escalation models
    (as configured when the run starts: an escalation set during the run to a model whose
    queue this process does not consume is not used, and its rows are claimed as usual)."""
    return [CONTROL_QUEUE] + sorted(queue_for_model(m) for m in _with_escalations(models, config))


#: Most worker threads an embedded run starts by itself (``--concurrency`` sets any number).
MAX_DEFAULT_CONCURRENCY = 1024


def default_concurrency(models: list[str], config: LiveConfig) -> int:
    """The sum of the batch's models' limits (and their escalation models') when the run
    starts, so every slot the limits allow has a thread; at least 4, at most
    ``MAX_DEFAULT_CONCURRENCY``. A limit raised during the run past it is capped by it."""
    names = _with_escalations(models, config)
    return max(4, min(MAX_DEFAULT_CONCURRENCY, sum(config.limit_for(m) for m in names)))


class InProcess:
    """The embedded mode's moving parts around one SQLite file: a Celery worker thread on the
    in-process broker, and the claimer, finalize and reaper passes that beat runs elsewhere
    (``tick``). ``run_batch`` runs them until one batch ends; ``serve`` for the server's
    lifetime (``Background``), adding the queues of models as batches bring them."""

    def __init__(self, client: Client, concurrency: int):
        self.client = client
        self.settings = client.settings
        self.concurrency = concurrency
        self.worker: EmbeddedWorker | None = None
        self._last_reap = 0.0

    def start(self, models: list[str]) -> None:
        processors.load(self.settings)  # a bad FUSILLADE_PROCESSORS: ConfigError before any run
        configure(embedded_settings(self.settings))
        # A fresh producer pool: the worker of an earlier run in this process closed its
        # pool when it stopped (a notebook, a script running two batches).
        reset_broker_connections()
        app.conf.broker_transport_options = {"polling_interval": 0.005}
        upstream.POOL_SIZE["size"] = self.concurrency  # the attempt threads and connections
        queues = queues_for(models, live.current(self.client.store, self.settings))
        self.worker = EmbeddedWorker(queues, self.concurrency)
        self.worker.start()
        from .tasks import SIZER

        SIZER.only_consumer = self.concurrency  # messages sized to this process's -c
        SIZER.only_queues = frozenset(queues)

    def consume(self, models: list[str]) -> None:
        """Consume the queues of ``models`` (and their escalation models) too, from now on."""
        from .tasks import SIZER

        assert self.worker is not None
        wanted = queues_for(models, live.current(self.client.store, self.settings))
        new = [q for q in wanted if q not in SIZER.only_queues]
        if new:
            self.worker.add_queues(new)
            SIZER.only_queues = SIZER.only_queues | frozenset(new)

    def tick(self, now: float | None = None) -> None:
        """One pass of what beat schedules in the distributed mode: the reaper (every 5 s),
        the claimer over every model, finalize."""
        from .tasks import consumed_in, publish_execute

        store, settings = self.client.store, self.settings
        now = time.time() if now is None else now
        if now - self._last_reap > 5.0:
            maintenance.reap(store, settings, now)
            self._last_reap = now
        claimer.claim_all(store, settings, publish_execute, consumed_in(store, settings))
        maintenance.finalize(store, settings)

    def stop(self, wait: bool = True, timeout: float = 30.0) -> None:
        from .tasks import SIZER

        SIZER.only_consumer = None
        SIZER.only_queues = frozenset()
        if self.worker is not None:
            self.worker.stop(wait=wait, timeout=timeout)


def run_batch(
    client: Client,
    batch_id: str,
    on_progress: Progress | None = None,
    concurrency: int | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Process ``batch_id`` to a terminal status in this process; returns the Batch object.

    On the way in, rows left in flight by an earlier, interrupted run go back to pending: in
    embedded mode this process is the only worker, so they are orphans by definition. Setting
    ``stop`` ends the run as Ctrl-C does (KeyboardInterrupt) at the next tick."""
    store = client.store
    requeued = store.requeue_in_flight(batch_id)
    if requeued:
        log.info("resuming: %d requests of the interrupted run go back to pending", requeued)
    models = json.loads(store.get_batch_row(batch_id)["models"])
    if concurrency is None:
        concurrency = default_concurrency(models, live.current(store, client.settings))
    engine = InProcess(client, concurrency)
    engine.start(models)
    try:
        while True:
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
            engine.tick()
            batch = client.get_batch(batch_id, counts_max_age_s=0.5)
            if on_progress is not None:
                on_progress(batch)
            if BatchStatus(batch["status"]) in TERMINAL_BATCH:
                return batch
            time.sleep(TICK_S)
    except KeyboardInterrupt:
        if engine.worker is not None:
            engine.worker.stop(wait=False, timeout=2.0)
        raise
    finally:
        engine.stop(wait=True)


#: Worker threads of an embedded server (``serve --concurrency``): its batches' models are
#: not known when it starts; the model limits bound what runs at once.
SERVER_CONCURRENCY = 256
#: How long a stopping server waits for its running calls (``Background.stop``).
SERVER_STOP_GRACE_S = 5.0


class Background:
    """The in-process worker and claimer of an embedded server (``fusillade-celery serve``
    on the SQLite file), for the server's lifetime, in a thread of its own. ``wake()`` runs
    the next pass at once (a batch was created), else one runs every ``TICK_S``."""

    def __init__(self, client: Client, concurrency: int = SERVER_CONCURRENCY):
        self.engine = InProcess(client, concurrency)
        self.store = client.store
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # One server per file: whatever a previous server left in flight is orphaned.
        requeued = self.store.requeue_in_flight(None)
        if requeued:
            log.info("%d requests left in flight by the last server go back to pending", requeued)
        self.engine.start(sorted(self.store.active_models()))
        self._thread = threading.Thread(target=self._loop, name="fusillade-embedded", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.engine.consume(sorted(self.store.active_models()))
                self.engine.tick()
            except Exception as exc:  # noqa: BLE001 - the next pass tries again
                log.warning("embedded pass failed (%s); trying again", exc)
            self._wake.wait(TICK_S)
            self._wake.clear()

    def stop(self, grace_s: float = SERVER_STOP_GRACE_S) -> None:
        """Stop claiming; let running calls finish and be written for up to ``grace_s``. A
        thread cannot be interrupted, so calls still running then are left: their rows stay
        in flight and go back to pending when a server starts on the file again."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        self.engine.stop(wait=True, timeout=grace_s)
