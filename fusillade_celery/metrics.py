"""Prometheus metrics of this process, served by each worker on ``FUSILLADE_METRICS_PORT``,
and the status line each worker logs every ``FUSILLADE_STATUS_LOG_INTERVAL_MS``.

Counted where the outcome is decided: the write-back (``execute``), the claim (``claimer``),
the reaper, expiry, finalize and purge (``maintenance``), the heartbeat (``workers``). Never
by a query of their own; per request, the attempt is timed and a few dict entries tallied,
and the counters move once per chunk of results (``count_written``): a locked increment per
request and counter costs more than that (about 1-2 us each under gevent). Names and labels
are fusillade's, so its users' dashboards and alerts carry over. The cluster-wide gauges
(queue depth, batches, workers alive) are read from the database by one exporter per
deployment instead (``exporter.py``).

Labels name the routed model: the model whose queue, limit and upstream served the request
(the escalation model once escalated; ``requests_routed_to_escalation_total`` counts those).

A prefork worker runs its tasks in child processes, whose counters the parent, which serves
them, cannot see: there prometheus-client's multiprocess mode is used, which keeps every
process's values in files of ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory per worker) and
sums them when scraped. Under ``-P gevent`` or ``-P threads`` (one process) the process's own
registry is served. Either way only this module's metrics are served: a ``celery`` process
has imported prometheus-client before this module (Flower's command plugin registers its own
metrics), so neither its default registry nor its choice of value class is ours to rely on.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    multiprocess,
    start_http_server,
    values,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prefork_worker(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is a ``celery worker`` on the prefork pool (Celery's default when no
    ``-P`` is given)."""
    args = list(argv[1:])
    if "worker" not in args:
        return False
    pool = "prefork"
    rest = args[args.index("worker") + 1 :]
    for i, arg in enumerate(rest):
        if arg in ("-P", "--pool") and i + 1 < len(rest):
            pool = rest[i + 1]
        elif arg.startswith("--pool="):
            pool = arg.split("=", 1)[1]
        elif arg.startswith("-P") and len(arg) > 2:
            pool = arg[2:]
    return pool in ("prefork", "processes")


def _remove_dir(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child that happens to run atexit
        shutil.rmtree(path, ignore_errors=True)


def _multiprocess_dir() -> str | None:
    """The directory of multiprocess mode: the operator's ``PROMETHEUS_MULTIPROC_DIR``, else
    a fresh one for a prefork worker (its children inherit it; removed when the worker
    exits), else None (one process: the plain registry)."""
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        return configured
    if not prefork_worker(sys.argv):
        return None
    path = tempfile.mkdtemp(prefix="fusillade-metrics-")
    os.environ[MULTIPROC_ENV] = path
    atexit.register(_remove_dir, path, os.getpid())
    return path


MULTIPROCESS_DIR = _multiprocess_dir()
if MULTIPROCESS_DIR is not None and not getattr(values.ValueClass, "_multiprocess", False):
    # prometheus-client chose its value class when first imported, before the directory was
    # set (see the module's docstring): metrics made from now on keep their values there.
    values.ValueClass = values.MultiProcessValue()

log = logging.getLogger(__name__)
#: The status line's own logger, shown at a worker's default level (``failures.worker_logging``).
status_log = logging.getLogger(__name__ + ".status")
P = ParamSpec("P")
R = TypeVar("R")

#: This process's metrics (and its process, platform and GC collectors), served under gevent
#: and threads; in multiprocess mode ``registry()`` serves the directory's sum instead.
REGISTRY = CollectorRegistry()
for _collector in (ProcessCollector, PlatformCollector, GCCollector):
    _collector(registry=REGISTRY)

REQUESTS_COMPLETED = Counter(
    "fusillade_requests_completed_total",
    "Requests completed (written back)",
    ["model"],
    registry=REGISTRY,
)
REQUESTS_FAILED = Counter(
    "fusillade_requests_failed_total",
    "Requests failed for good, by reason (the error kind) and HTTP status ('none': no status)",
    ["model", "reason", "status_code"],
    registry=REGISTRY,
)
REQUESTS_IN_FLIGHT = Gauge(
    "fusillade_requests_in_flight",
    "Requests this process is processing (started, not yet written back)",
    ["model"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
#: Seconds of one database statement (the claim, the heartbeat upsert).
STATEMENT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CLAIM_DURATION = Histogram(
    "fusillade_claim_duration_seconds",
    "Time of one claim statement (lock, count, pick, claim)",
    buckets=STATEMENT_BUCKETS,
    registry=REGISTRY,
)
CLAIM_SIZE = Histogram(
    "fusillade_claim_size",
    "Requests one claim statement claimed",
    buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
    registry=REGISTRY,
)
CLAIM_CAPACITY = Gauge(
    "fusillade_claim_capacity",
    "The model's in-flight limit as the latest claim of this process used it (live limits)",
    ["model"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "fusillade_request_duration_seconds",
    "Time of one upstream attempt, whatever its outcome",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
RETRY_ATTEMPTS_ON_SUCCESS = Histogram(
    "fusillade_retry_attempts_on_success",
    "Retries a request had before it completed (0: the first attempt)",
    buckets=(0, 1, 2, 3, 5, 10, 20, 50, 100, 1000),
    registry=REGISTRY,
)
ROUTED_TO_ESCALATION = Counter(
    "fusillade_requests_routed_to_escalation_total",
    "Requests claimed for their model's SLA escalation model",
    ["original_model", "escalation_model"],
    registry=REGISTRY,
)
REQUESTS_CANCELLED = Counter(
    "fusillade_requests_cancelled_total",
    "Requests of cancelled batches, counted as they close",
    registry=REGISTRY,
)
BATCHES_CANCELLED = Counter(
    "fusillade_batches_cancelled_total",
    "Batches closed as cancelled (by finalize)",
    registry=REGISTRY,
)
ROWS_PURGED = Counter(
    "fusillade_rows_purged_total", "Rows erased by purge (requests, templates)", registry=REGISTRY
)
HEARTBEAT_DURATION = Histogram(
    "fusillade_heartbeat_duration_seconds",
    "Time of one heartbeat upsert",
    buckets=STATEMENT_BUCKETS,
    registry=REGISTRY,
)
COMPLETED_AFTER_SLA = Counter(
    "fusillade_requests_completed_after_sla_total",
    "Requests completed after their batch's deadline (expires_at)",
    registry=REGISTRY,
)


class _Model:
    """One model's label children, resolved once: ``.labels()`` builds a key and takes a lock
    on every call, too much to pay on every request."""

    __slots__ = ("completed", "duration", "in_flight")

    def __init__(self, model: str):
        self.completed = REQUESTS_COMPLETED.labels(model)
        self.in_flight = REQUESTS_IN_FLIGHT.labels(model)
        self.duration = REQUEST_DURATION.labels(model)


_MODELS: dict[str, _Model] = {}
_FAILED: dict[tuple[str, str, int | None], Any] = {}
_ESCALATED: dict[tuple[str, str], Any] = {}


def _model(name: str) -> _Model:
    m = _MODELS.get(name)
    if m is None:  # a race only builds the same children twice
        m = _MODELS[name] = _Model(name)
    return m


def timed(model: str, call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``call(*args)``, one upstream attempt for ``model``, timed (even if a cancel kills
    it)."""
    started = time.perf_counter()
    try:
        return call(*args, **kwargs)
    finally:
        _model(model).duration.observe(time.perf_counter() - started)


def add_in_flight(counts: dict[str, int], sign: int = 1) -> None:
    """Requests per model that this process started (``sign`` 1) or no longer runs (-1).
    Moved once per message, hand-off or chunk of results, not per request."""
    for model, n in counts.items():
        _model(model).in_flight.inc(sign * n)


def count_written(
    completed: dict[str, int],
    failed: dict[tuple[str, str | None, int | None], int],
    retries: list[int],
    late: int,
) -> None:
    """One chunk of results as written back (``execute._count_and_retry``): completed
    requests per model, the retries each completed one had, how many completed after their
    batch's deadline, and failed ones per (model, reason, status)."""
    for model, n in completed.items():
        _model(model).completed.inc(n)
    for attempts in retries:
        RETRY_ATTEMPTS_ON_SUCCESS.observe(attempts)
    if late:
        COMPLETED_AFTER_SLA.inc(late)
    for (model, reason, status), n in failed.items():
        count_failed(model, reason, status, n)


def count_failed(model: str, reason: str | None, status: int | None, n: int = 1) -> None:
    """``n`` requests failed for good (retries spent or not retriable, expired, reaped once
    too often). ``reason`` is the error kind (fusillade's ``metric_label``)."""
    key = (model, reason or "unknown", status)
    child = _FAILED.get(key)
    if child is None:
        child = _FAILED[key] = REQUESTS_FAILED.labels(
            model, key[1], "none" if status is None else str(status)
        )
    child.inc(n)


def count_claim(model: str, routed: str, limit: int, claimed: int, seconds: float) -> None:
    """One claim statement of ``model`` into ``routed``'s queue under ``limit``."""
    CLAIM_DURATION.observe(seconds)
    CLAIM_SIZE.observe(claimed)
    CLAIM_CAPACITY.labels(routed).set(limit)
    if routed != model and claimed:
        child = _ESCALATED.get((model, routed))
        if child is None:
            child = _ESCALATED[model, routed] = ROUTED_TO_ESCALATION.labels(model, routed)
        child.inc(claimed)


def count_cancelled(batches: int, requests: int) -> None:
    BATCHES_CANCELLED.inc(batches)
    REQUESTS_CANCELLED.inc(requests)


def count_purged(rows: int) -> None:
    ROWS_PURGED.inc(rows)


def observe_heartbeat(seconds: float) -> None:
    HEARTBEAT_DURATION.observe(seconds)


# ---------------------------------------------------------------------- serving

_served: dict[str, Any] = {}
_lock = threading.Lock()


def registry() -> CollectorRegistry:
    """What this process serves and its status line reads: its own metrics, or in
    multiprocess mode the sum over every process that wrote to the directory."""
    if MULTIPROCESS_DIR is None:
        return REGISTRY
    with _lock:
        if "registry" not in _served:
            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg, path=MULTIPROCESS_DIR)
            _served["registry"] = reg
        served: CollectorRegistry = _served["registry"]
        return served


def serve(port: int, host: str = "0.0.0.0", reg: CollectorRegistry | None = None) -> int:
    """Serve ``/metrics`` of ``reg`` (this process's: ``registry()``) from a daemon thread (a
    greenlet under gevent); returns the port bound (``port`` 0 picks a free one)."""
    server, _ = start_http_server(port, addr=host, registry=reg or registry())
    return int(server.server_port)


def on_worker_start(metrics_port: int, status_log_interval_ms: int) -> None:
    """At a worker's start (the process that serves: the only one under gevent or threads, the
    parent under prefork), once per process: serve the metrics, start the status line. A port
    already taken (two workers on one host with the same setting) is logged, not fatal: the
    worker's job is the requests."""
    with _lock:
        if _served.get("started"):
            return
        _served["started"] = True
    if metrics_port:
        try:
            bound = serve(metrics_port)
        except OSError as exc:
            log.warning("metrics not served: port %d: %s", metrics_port, exc)
        else:
            log.info("metrics served on :%d/metrics", bound)
    if status_log_interval_ms > 0:
        StatusLog(registry(), status_log_interval_ms / 1000.0).start()


def process_exited(pid: int) -> None:
    """A prefork child is leaving: its live gauges (in flight) leave the sum; its counters
    stay, as counts of what it did."""
    if MULTIPROCESS_DIR is not None:
        multiprocess.mark_process_dead(pid, MULTIPROCESS_DIR)


# ---------------------------------------------------------------------- status line


def _per_model(reg: CollectorRegistry) -> dict[str, dict[str, float]]:
    """{in_flight|completed|failed: {model: value}} read from ``reg``."""
    wanted = {
        "fusillade_requests_in_flight": ("in_flight", ""),
        "fusillade_requests_completed": ("completed", "_total"),
        "fusillade_requests_failed": ("failed", "_total"),
    }
    out: dict[str, dict[str, float]] = {k: {} for k, _ in wanted.values()}
    for family in reg.collect():
        if family.name not in wanted:
            continue
        key, suffix = wanted[family.name]
        for sample in family.samples:
            if sample.name == family.name + suffix:
                model = sample.labels.get("model", "")
                out[key][model] = out[key].get(model, 0.0) + sample.value
    return out


def _models(values: dict[str, float], keep_zero: bool = False) -> str:
    shown = [f"{m}={v:g}" for m, v in sorted(values.items()) if keep_zero or v]
    return f" ({' '.join(shown)})" if shown else ""


class StatusLog:
    """One INFO line per interval: this worker's requests in flight per model, and the
    requests completed and failed since the previous line, read from the same counters
    ``/metrics`` serves (so the line and the dashboard agree, and it costs no query)."""

    def __init__(self, reg: CollectorRegistry, interval_s: float):
        self.reg = reg
        self.interval_s = interval_s
        self._last = _per_model(reg)
        self._last_at = time.monotonic()
        self._stop = threading.Event()

    def line(self) -> str:
        now_values, now = _per_model(self.reg), time.monotonic()
        since: dict[str, dict[str, float]] = {}
        for key in ("completed", "failed"):
            before = self._last[key]
            since[key] = {m: v - before.get(m, 0.0) for m, v in now_values[key].items()}
        elapsed = now - self._last_at
        self._last, self._last_at = now_values, now
        in_flight = now_values["in_flight"]
        return (
            f"status: {sum(in_flight.values()):g} in flight{_models(in_flight, True)}; "
            f"in the last {elapsed:.1f} s: {sum(since['completed'].values()):g} completed"
            f"{_models(since['completed'])}, {sum(since['failed'].values()):g} failed"
            f"{_models(since['failed'])}"
        )

    def start(self) -> None:
        threading.Thread(target=self._run, name="fusillade-status-log", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                status_log.info("%s", self.line())
            except Exception as exc:  # noqa: BLE001 - a status line is not worth the worker
                log.warning("status line failed: %s", exc)
