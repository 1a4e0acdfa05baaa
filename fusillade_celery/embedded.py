"""Embedded mode: SQLite file, in-process broker, a Celery worker thread and the periodic work
in the calling thread. No servers to set up.

It runs the very same claimer, execute task and maintenance functions as the distributed mode;
only the engine (SQLite) and the broker (kombu's in-memory transport) differ. The state of record
is the SQLite file, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

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
    settings = client.settings
    processors.load(settings)  # a bad FUSILLADE_PROCESSORS: ConfigError before anything runs
    configure(embedded_settings(settings))
    # A fresh producer pool: the worker of an earlier run in this process closed its pool
    # when it stopped (a notebook, a script running two batches).
    reset_broker_connections()
    app.conf.broker_transport_options = {"polling_interval": 0.005}
    store = client.store
    requeued = store.requeue_in_flight(batch_id)
    if requeued:
        log.info("resuming: %d requests of the interrupted run go back to pending", requeued)
    row = store.get_batch_row(batch_id)
    import json

    models = json.loads(row["models"])
    config = live.current(store, settings)
    if concurrency is None:
        concurrency = default_concurrency(models, config)
    upstream.POOL_SIZE["size"] = concurrency  # the attempt threads and their HTTP connections
    queues = queues_for(models, config)
    worker = EmbeddedWorker(queues, concurrency)
    worker.start()
    from .tasks import SIZER, consumed_in, publish_execute

    SIZER.only_consumer = concurrency  # messages sized to this process's -c
    SIZER.only_queues = frozenset(queues)

    last_reap = 0.0
    try:
        while True:
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
            now = time.time()
            if now - last_reap > 5.0:
                maintenance.reap(store, settings, now)
                last_reap = now
            claimer.claim_all(store, settings, publish_execute, consumed_in(store, settings))
            maintenance.finalize(store, settings)
            batch = client.get_batch(batch_id, counts_max_age_s=0.5)
            if on_progress is not None:
                on_progress(batch)
            if BatchStatus(batch["status"]) in TERMINAL_BATCH:
                return batch
            time.sleep(TICK_S)
    except KeyboardInterrupt:
        worker.stop(wait=False, timeout=2.0)
        raise
    finally:
        SIZER.only_consumer = None
        SIZER.only_queues = frozenset()
        worker.stop(wait=True)
