"""The Celery application: build it, load config, include the tasks. Nothing else lives here.

``celery -A fusillade_celery worker|beat|flower`` finds ``fusillade_celery.app``. Configuration
comes from :class:`~fusillade_celery.settings.Settings` (env vars), then from an optional
``celeryconfig`` module on the path (operator overrides of Celery's own options).
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
from typing import Any

from celery import Celery, signals
from kombu import pools as kombu_pools

from .cancel_watch import gevent_active
from .compat import patch_gevent_waits, patch_kombu_redis_reconnect
from .db import get_engine
from .queues import CONTROL_QUEUE, direct_queue
from .schedule import beat_schedule
from .settings import MEMORY_BROKER, ConfigError, Settings, unknown_env_names
from .store import Store

patch_kombu_redis_reconnect()
if gevent_active():  # a -P gevent worker: celery patched the process before importing us
    patch_gevent_waits()
app = Celery("fusillade_celery", include=["fusillade_celery.tasks"])
log = logging.getLogger(__name__)

_current: dict[str, Any] = {}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery options implied by the settings (docs/architecture.md sections 4-6)."""
    return {
        "broker_url": settings.broker_url or MEMORY_BROKER,
        "broker_connection_retry_on_startup": True,
        # max_connections: kombu's Redis transport keeps a client pool per channel, 10 by
        # default. Under -P gevent every finishing task acks concurrently; past 10 the ack
        # failed ("Couldn't ack ... Too many connections"), the consumer reconnected and the
        # message's rows waited for the reaper (seen in 13 of 54 benchmark worker logs).
        # Connections are opened only as needed, so a high cap costs nothing when idle.
        "broker_transport_options": {"visibility_timeout": 3600, "max_connections": 2000},
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": CONTROL_QUEUE,
        "task_queues": [direct_queue(CONTROL_QUEUE)],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 4,
        "worker_send_task_events": not settings.embedded,  # Flower
        "task_send_sent_event": not settings.embedded,
        "worker_hijack_root_logger": False,
        "beat_schedule": beat_schedule(settings),
        "timezone": "UTC",
    }


def configure(settings: Settings | None = None) -> Settings:
    """(Re)configure the app from settings; the CLI and tests call this with explicit ones."""
    settings = settings or Settings.from_env()
    previous = _current.get("settings")
    _current.clear()
    _current["settings"] = settings
    app.conf.update(celery_config(settings))
    _apply_overrides()
    if previous is not None and previous.broker_url != settings.broker_url:
        reset_broker_connections()
    return settings


def reset_broker_connections() -> None:
    """Celery caches its producer pool on first publish; after the broker URL changes (one
    process embedding a run after using a server broker, as tests do) publishes would still go
    to the old broker, and after an embedded run's worker stopped (which closes the pool) they
    failed ("Acquire on closed pool"). Celery's own after-fork hook resets the same two
    attributes; kombu's registries of pools per connection are emptied too, or the closed
    pool is what the next lookup of the same broker URL finds."""
    kombu_pools.reset()  # closes every registered pool, app._pool among them
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None


def _apply_overrides() -> None:
    name = os.environ.get("FUSILLADE_CELERY_CONFIG", "celeryconfig")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return
    app.conf.update(
        {k: v for k, v in vars(module).items() if k.islower() and not k.startswith("_")}
    )


def get_settings() -> Settings:
    if "settings" not in _current:
        configure()
    settings: Settings = _current["settings"]
    return settings


def get_store() -> Store:
    settings = get_settings()
    return Store(get_engine(settings.database_url, settings.db_pool_size, pre_ping=False))


@signals.celeryd_after_setup.connect
def _consume_control_queue(sender: Any, instance: Any, **_: Any) -> None:
    """Every worker also consumes the control queue, whatever its ``-Q``: then beat plus
    ``worker -Q model.gpt-4`` is a complete deployment (claimer and maintenance find a consumer)."""
    instance.app.amqp.queues.select_add(CONTROL_QUEUE)


@signals.worker_init.connect
def _check_schema(**_: Any) -> None:
    """Fail at start-up with a clear message, not on the first task, if not migrated (a
    raised error would only be logged by Celery, and the worker would run)."""
    from .db import SchemaError
    from .migrate import ensure_schema

    try:
        ensure_schema(get_store().engine)
    except SchemaError as exc:
        _refuse(f"database: {exc}")


@signals.worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    """Register this worker and keep its heartbeat (the process that runs the tasks under
    the gevent, threads and solo pools)."""
    from . import workers

    names = ",".join(sorted(q.name for q in sender.task_consumer.queues)) if sender else ""
    # -c, advertised so the claimer never puts more requests in one message than a consumer
    # of the queue runs at once (claimer.MessageSizer).
    concurrency = getattr(getattr(sender, "controller", None), "concurrency", None)
    workers.start(get_store(), get_settings(), names, int(concurrency) if concurrency else None)


@signals.worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    """Serve this worker's metrics (``FUSILLADE_METRICS_PORT``) and start its status line,
    in the process that serves them: the only one under gevent and threads, the parent
    (summing its children's, ``metrics.py``) under prefork."""
    from . import metrics

    settings = get_settings()
    metrics.on_worker_start(settings.metrics_port, settings.status_log_interval_ms)


@signals.worker_process_shutdown.connect
def _child_metrics_gone(pid: int | None = None, **_: Any) -> None:
    from . import metrics

    metrics.process_exited(pid or os.getpid())


#: Young-generation threshold of the garbage collector in a worker (Python's default: 700).
GC_THRESHOLD = (50_000, 20, 100)


@signals.worker_ready.connect
@signals.worker_process_init.connect
def _tune_gc(**_: Any) -> None:
    """A worker allocates a few container objects per request (responses, rows, greenlets)
    and frees nearly all of them by reference counting, but at the default threshold the
    collector still ran every 700 allocations and walked Celery's, SQLAlchemy's and the
    worker's own long-lived objects each time it reached the older generations. Freezing what
    start-up made (it is never garbage) and collecting the young generation less often cut
    the workers' CPU per request by 15-20 % at 1,000 requests a second (benchmark "latency",
    paired runs: 1.01-1.06 -> 0.81-0.91 ms, 0.78 -> 0.81-0.82 of the ideal rate; worker RSS
    still flat in "memory")."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


@signals.worker_process_init.connect
def _start_child_heartbeat(**_: Any) -> None:
    """Prefork children run the tasks there: each gets its own row and heartbeat."""
    from . import workers

    workers.start(get_store(), get_settings(), "prefork-child")


@signals.worker_shutdown.connect
@signals.worker_process_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    from . import workers

    workers.stop()


#: Set while an embedded run's worker starts in this process (``embedded.EmbeddedWorker``):
#: that worker runs on the in-process broker by design.
IN_PROCESS_WORKER = {"starting": False}


@signals.import_modules.connect
def _require_worker_settings(**_: Any) -> None:
    """Sent when a ``celery worker`` or ``celery beat`` process loads its task modules:
    before the worker's banner and before either connects anywhere. Other celery commands
    that load them (``flower``, ``shell``, ``report``) are left alone."""
    role = _celery_command()
    if not IN_PROCESS_WORKER["starting"] and role in ("worker", "beat"):
        _require_settings(role)


def _celery_command() -> str | None:
    """``worker`` or ``beat`` when this process is ``celery ... worker|beat``, else None."""
    for word in sys.argv[1:]:
        if word in ("worker", "beat"):
            return word
    return None


def _require_settings(role: str) -> None:
    """A worker or beat never runs on a bad setting or on Celery's defaults: settings that
    did not parse at import (``_configure_at_import``), or no broker at all, end the process
    here with one line naming the variable and exit status 2. Why not raise: Celery logs an
    exception of a signal handler with its traceback and carries on, so the worker ran on
    ``amqp://localhost`` (or ``memory://``, where nothing it consumed was ever published)."""
    try:
        settings = get_settings()
    except ConfigError as exc:
        _refuse(f"configuration: {exc}")
        return
    if settings.embedded:
        _refuse(
            f"configuration: FUSILLADE_BROKER_URL is not set; a celery {role} needs the broker "
            "its workers and beat share (e.g. redis://host:6379/0). To process a file in one "
            "process with no servers, use `fusillade-celery run FILE`"
        )
    if role == "worker":  # its processors are imported now, not at its first request
        from . import processors

        try:
            processors.load(settings)
        except ConfigError as exc:
            _refuse(f"configuration: {exc}")
            return
    for name in unknown_env_names():
        log.warning("unknown setting %s is ignored", name)
    if 2 * settings.heartbeat_interval_ms > settings.stale_worker_threshold_ms:
        log.warning(
            "FUSILLADE_HEARTBEAT_INTERVAL_MS (%d) is more than half of "
            "FUSILLADE_STALE_WORKER_THRESHOLD_MS (%d): a late heartbeat lets the reaper take "
            "a live worker's requests",
            settings.heartbeat_interval_ms,
            settings.stale_worker_threshold_ms,
        )
    for name, value in (
        ("FUSILLADE_TIMEOUT_MS", settings.timeout_ms),
        ("FUSILLADE_STREAM_TOTAL_TIMEOUT_MS", settings.stream_total_timeout_ms),
    ):
        if settings.processing_timeout_ms < value:
            log.warning(
                "FUSILLADE_PROCESSING_TIMEOUT_MS (%d) is below %s (%d): a call still running "
                "at the processing timeout is reaped and may be sent twice",
                settings.processing_timeout_ms,
                name,
                value,
            )


def _refuse(message: str) -> None:
    sys.stderr.write(f"fusillade-celery: error: {message}\n")
    sys.stderr.flush()
    os._exit(2)  # nothing has started yet: no thread, connection or file to close


def _configure_at_import() -> None:
    """Configure from the environment as the package is imported (``celery -A`` imports it
    before anything else runs), but leave a bad setting to be reported where it is used:
    raised here, it was a traceback before the CLI could print its one-line error (every
    CLI command imports the package), even for ``--help``."""
    try:
        configure()
    except ConfigError:
        _current.clear()  # get_settings() parses again and raises the same error


_configure_at_import()
