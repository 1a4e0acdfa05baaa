"""``fusillade-celery exporter``: the cluster-wide gauges, read from the database and served
for Prometheus. One per deployment.

A worker counts what it does (``metrics.py``); what no single worker knows, the queue depth
by model and state, the batches by status, the workers alive, is read here, by indexed
counts (``Store.cluster_gauges``), at most once per ``CACHE_S`` whatever the number of
scrapers, so scraping costs the database a few index scans every few seconds.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from .metrics import serve
from .settings import Settings
from .states import NOT_TERMINAL, BatchStatus
from .store import ClusterGauges, Store

log = logging.getLogger(__name__)

#: How long one read of the database serves scrapes.
CACHE_S = 5.0


class ClusterCollector:
    """A prometheus-client collector of ``Store.cluster_gauges``, cached ``cache_s``.

    Every series once seen is exported on every scrape, at 0 when its count is gone (a model
    whose queue drained), rather than dropped: a series that vanishes reads "no data" in a
    dashboard and "still the last value" in some alerts. If the database cannot be read the
    last values stand and ``fusillade_exporter_up`` reads 0."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        cache_s: float = CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.stale_s = settings.stale_worker_threshold_ms / 1000.0
        self.cache_s = cache_s
        self.clock = clock
        self._lock = threading.Lock()
        self._read_at = -float("inf")
        self._ok = False
        self._depth: dict[tuple[str, str], int] = {}
        self._batches: dict[str, int] = dict.fromkeys((s.value for s in BatchStatus), 0)
        self._alive = 0

    def refresh(self) -> None:
        """Read the database unless the last read is younger than ``cache_s``."""
        with self._lock:
            if self.clock() - self._read_at < self.cache_s:
                return
            self._read_at = self.clock()
            try:
                gauges = self.store.cluster_gauges(time.time() - self.stale_s)
            except Exception as exc:  # noqa: BLE001 - served as fusillade_exporter_up 0
                log.warning("could not read the cluster gauges: %s", exc)
                self._ok = False
                return
            self._apply(gauges)
            self._ok = True

    def _apply(self, gauges: ClusterGauges) -> None:
        self._depth = dict.fromkeys(self._depth, 0)
        for model, state, n in gauges.queue_depth:
            self._depth[model, state] = self._depth.get((model, state), 0) + n
        models = {m for m, _ in self._depth}
        for model in models:  # every non-terminal state of every model seen
            for state in NOT_TERMINAL:
                self._depth.setdefault((model, state.value), 0)
        self._batches = {**dict.fromkeys(self._batches, 0), **gauges.batches}
        self._alive = gauges.workers_alive

    def describe(self) -> Iterator[Metric]:
        """The families, without reading the database (registration asks for them)."""
        return iter(self._families(with_values=False))

    def collect(self) -> Iterator[Metric]:
        self.refresh()
        return iter(self._families(with_values=True))

    def _families(self, with_values: bool) -> list[Metric]:
        depth = GaugeMetricFamily(
            "fusillade_queue_depth",
            "Requests not yet terminal by model and state (in-flight states by routed model)",
            labels=["model", "state"],
        )
        batches = GaugeMetricFamily(
            "fusillade_batches", "Batches by status (deleted ones left out)", labels=["status"]
        )
        alive = GaugeMetricFamily(
            "fusillade_workers_alive", "Worker processes whose heartbeat is fresh"
        )
        up = GaugeMetricFamily(
            "fusillade_exporter_up", "1 if the last read of the database succeeded"
        )
        if with_values:
            with self._lock:
                for (model, state), n in sorted(self._depth.items()):
                    depth.add_metric([model, state], n)
                for status, n in sorted(self._batches.items()):
                    batches.add_metric([status], n)
                alive.add_metric([], self._alive)
                up.add_metric([], 1 if self._ok else 0)
        return [depth, batches, alive, up]


def exporter_registry(store: Store, settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ClusterCollector(store, settings))
    return registry


def cmd_exporter(args: argparse.Namespace) -> int:
    from .db import get_engine

    settings = Settings.from_env()
    store = Store(get_engine(settings.database_url))
    store.cluster_gauges(time.time())  # an unreachable or unmigrated database: one line, now
    port = serve(args.port, args.host, exporter_registry(store, settings))
    print(f"fusillade-celery exporter: serving http://{args.host}:{port}/metrics", flush=True)
    threading.Event().wait()  # until Ctrl-C or SIGTERM: the server runs in a daemon thread
    return 0


def register(sub: Any) -> None:
    """Add the ``exporter`` command to the CLI's subparsers."""
    p = sub.add_parser(
        "exporter",
        help="serve cluster-wide Prometheus gauges (queue depth, batches, workers alive)",
        description=(
            "Serve /metrics with gauges read from FUSILLADE_DATABASE_URL (cached "
            f"{CACHE_S:g} s): fusillade_queue_depth{{model,state}}, fusillade_batches{{status}}, "
            "fusillade_workers_alive. Run one per deployment; each worker serves its own "
            "counters on FUSILLADE_METRICS_PORT."
        ),
    )
    p.add_argument("--port", type=int, default=9465, help="0 picks a free port (printed)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.set_defaults(func=cmd_exporter)
