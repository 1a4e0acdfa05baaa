"""Scrape a running cluster: beat, a ``-P gevent`` worker and a ``-P prefork`` worker (its
children's counters summed by multiprocess mode), each serving ``/metrics`` on its own
``FUSILLADE_METRICS_PORT``, and the exporter. After the batches end, each worker's counts
equal what its batch's requests ended as, failures labelled with their reason and status
code; the exporter shows the queue of a model no worker consumes, the batches and the
workers; each worker logs its status line. Redis database 3."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import line
from ..services import free_port, wait_for
from .conftest import Cluster, Processes, running_cluster

pytestmark = pytest.mark.integration

REDIS_DB = 3
Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Scrape:
    text = requests.get(url, timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Scrape, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def failures(samples: Scrape, model: str) -> dict[tuple[str, str], float]:
    """{(reason, status_code): count} of ``model``'s failed requests."""
    out = {}
    for (name, labels), v in samples.items():
        got = dict(labels)
        if name == "fusillade_requests_failed_total" and got.get("model") == model and v:
            out[got["reason"], got["status_code"]] = v
    return out


@pytest.fixture
def exporter() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def start_exporter(c: Cluster, procs: list[subprocess.Popen[str]]) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusillade_celery.cli", "exporter", "--host", "127.0.0.1"]
        + ["--port", "0"],
        env=c.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    assert proc.stdout is not None
    return proc.stdout.readline().strip().rsplit(" ", 1)[1]


def test_workers_and_the_exporter_serve_what_the_batches_did(
    pg_admin: str,
    pg_template: str,
    redis_base: str,
    tmp_path: Path,
    exporter: list[subprocess.Popen[str]],
) -> None:
    env = {
        "FUSILLADE_MAX_RETRIES": "1",
        "FUSILLADE_BACKOFF_MS": "100",
        "FUSILLADE_STATUS_LOG_INTERVAL_MS": "300",
    }
    with running_cluster(
        pg_admin, pg_template, redis_base, tmp_path, REDIS_DB, (), env, workers=0
    ) as (c, _):
        gevent_port, prefork_port = free_port(), free_port()
        Processes(c, "model.mg", "gevent").start_worker(
            "wg", 20, {"FUSILLADE_METRICS_PORT": str(gevent_port)}
        )
        Processes(c, "model.mp", "prefork").start_worker(
            "wp", 2, {"FUSILLADE_METRICS_PORT": str(prefork_port)}
        )
        gevent_batch = c.client.submit_batch(
            [line(f"ok{i}", model="mg") for i in range(20)]
            + [line(f"bad{i}", model="mg", mock_statuses=[400]) for i in range(2)]
            + [line(f"busy{i}", model="mg", mock_statuses=[503, 503]) for i in range(2)]
            + [line("reset", model="mg", mock_reset=5)]
        )
        prefork_batch = c.client.submit_batch(
            [line(f"p{i}", model="mp") for i in range(10)]
            + [line("p-bad", model="mp", mock_statuses=[429, 422])]
        )
        c.client.submit_batch([line(f"n{i}", model="nobody") for i in range(3)])
        for batch_id, total, failed in ((gevent_batch, 25, 5), (prefork_batch, 11, 1)):
            counts = c.wait_done(batch_id, 60)["request_counts"]
            assert counts == {"total": total, "completed": total - failed, "failed": failed}

        # Given the batches ended, when each worker is scraped, then its counts are its batch's
        # (polled: a finalize on another worker may close the batch an instant before the
        # last write-back's counts are made).
        def worker_counts(port: int, model: str, completed: float) -> Scrape | None:
            got = scrape(f"http://127.0.0.1:{port}/metrics")
            done = value(got, "fusillade_requests_completed_total", model=model) == completed
            return got if done else None

        wg = wait_for(lambda: worker_counts(gevent_port, "mg", 20), 10, what="mg's counts")
        assert failures(wg, "mg") == {
            ("non_retriable_http_status", "400"): 2,
            ("retriable_http_status", "503"): 2,
            ("network_error", "none"): 1,
        }
        assert value(wg, "fusillade_requests_in_flight", model="mg") == 0
        assert value(wg, "fusillade_request_duration_seconds_count", model="mg") == 28
        assert value(wg, "fusillade_retry_attempts_on_success_count") == 20

        wp = wait_for(lambda: worker_counts(prefork_port, "mp", 10), 10, what="mp's counts")
        assert failures(wp, "mp") == {("non_retriable_http_status", "422"): 1}
        assert value(wp, "fusillade_request_duration_seconds_count", model="mp") == 12
        assert value(wp, "fusillade_requests_in_flight", model="mp") == 0
        assert value(wp, "fusillade_heartbeat_duration_seconds_count") > 0

        # The exporter: the queue no worker consumes, the batches, the worker processes
        # (gevent: one; prefork: the parent and its two children).
        url = start_exporter(c, exporter)
        alive = len(c.client.store.worker_rows())

        def cluster() -> Scrape | None:
            got = scrape(url)
            pending = value(got, "fusillade_queue_depth", model="nobody", state="pending")
            return got if pending == 3 else None

        ex = wait_for(cluster, 15, what="the exporter to show the unserved queue")
        assert value(ex, "fusillade_batches", status="completed") == 2
        assert value(ex, "fusillade_batches", status="in_progress") == 0  # nothing claimed
        assert value(ex, "fusillade_batches", status="validating") == 1
        assert value(ex, "fusillade_workers_alive") == alive == 4
        assert value(ex, "fusillade_queue_depth", model="mg", state="processing") == 0

        # Each worker logs its status line: the gevent worker, and the prefork parent with
        # its children's counts.
        def status_lines(name: str) -> list[str]:
            text = (c.log_dir / f"{name}.log").read_text(errors="replace")
            return [ln for ln in text.splitlines() if "status: " in ln]

        wait_for(lambda: any("completed (mg=" in ln for ln in status_lines("wg")), 5)
        wait_for(lambda: any("completed (mp=" in ln for ln in status_lines("wp")), 5)
        assert "in flight (mg=0)" in status_lines("wg")[-1]
