"""Metrics counted where outcomes are decided, in this process (SQLite and PostgreSQL): the
write-back, the claim and its escalations, the reaper, expiry, finalize of a cancelled batch,
purge; the status line; the exporter's gauges; and the Grafana dashboard naming only metrics
the code exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import cast

import pytest

from fusillade_celery import claimer, maintenance, metrics
from fusillade_celery.exporter import ClusterCollector
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.settings import Escalation, Settings
from fusillade_celery.store import Store
from fusillade_celery.submit import Client

from .conftest import line
from .services import wait_for
from .test_execute import Recorder, run_claimed, run_message, states

ROOT = Path(__file__).resolve().parent.parent


class Samples:
    """Sample values of this process's registry, as differences from when it was made (the
    registry is the process's: other tests count into it too)."""

    def __init__(self) -> None:
        self.before = self._read()

    @staticmethod
    def _read() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in metrics.registry().collect()
            for s in family.samples
        }

    def delta(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return self._read().get(key, 0.0) - self.before.get(key, 0.0)

    def now(self, name: str, **labels: str) -> float:
        return self._read().get((name, frozenset(labels.items())), 0.0)


def test_the_write_back_counts_each_outcome_once_with_its_reason_and_status(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """Given a completed request, one completed after a retry, a 400, a 503 past its retries
    and a connection reset past its retries: completed counts two with their retries, failed
    counts each with the error kind and status code ('none' without one), each attempt is
    timed, and nothing is left in flight."""
    s = settings.replace(max_retries=1, backoff_ms=1, max_backoff_ms=1)
    batch_id = client.submit_batch(
        [
            line("ok", model="mx"),
            line("retried", model="mx", mock_statuses=[503, 200]),
            line("bad", model="mx", mock_statuses=[400]),
            line("busy", model="mx", mock_statuses=[503, 503]),
            line("reset", model="mx", mock_reset=5),
        ]
    )
    seen = Samples()
    rec = Recorder()
    claimer.claim_all(client.store, s, rec.publish)
    run_claimed(client.store, s, rec)
    while rec.retries:  # run the countdown messages once their rows are due
        ids, _ = rec.retries.pop(0)
        rows = {r["id"]: r for r in client.store.request_rows(batch_id)}
        due = max(rows[i]["not_before"] for i in ids)
        wait_for(lambda due=due: time.time() >= due, 5, what="the retry to be due")
        run_message(client.store, s, rows[ids[0]]["claim_token"], ids, rec)
    assert states(client.store, batch_id) == {
        "ok": "completed",
        "retried": "completed",
        "bad": "failed",
        "busy": "failed",
        "reset": "failed",
    }
    assert seen.delta("fusillade_requests_completed_total", model="mx") == 2
    failed = "fusillade_requests_failed_total"
    assert seen.delta(failed, model="mx", reason="non_retriable_http_status", status_code="400")
    assert seen.delta(failed, model="mx", reason="retriable_http_status", status_code="503") == 1
    assert seen.delta(failed, model="mx", reason="network_error", status_code="none") == 1
    assert seen.delta("fusillade_retry_attempts_on_success_count") == 2
    assert seen.delta("fusillade_retry_attempts_on_success_sum") == 1  # "retried": one retry
    assert seen.delta("fusillade_request_duration_seconds_count", model="mx") == 8  # attempts
    assert seen.now("fusillade_requests_in_flight", model="mx") == 0
    assert seen.delta("fusillade_requests_completed_after_sla_total") == 0
    assert seen.delta("fusillade_claim_size_sum") == 5


def test_a_stale_result_is_not_counted(client: Client, settings: Settings) -> None:
    """A result whose row was reaped meanwhile is fenced out, and not counted either."""
    client.submit_batch([line("a", model="stale")])
    token, rows = client.store.claim("stale", "stale", 5, 5, time.time())
    seen = Samples()
    client.store.reap(time.time() + 120, 60, 600)  # the claim timed out: back to pending
    client.store.claim("stale", "stale", 5, 5, time.time())  # and claimed by another claim
    assert run_message(client.store, settings, token, [rows[0].id], Recorder()).started == 0
    assert seen.delta("fusillade_requests_completed_total", model="stale") == 0


def test_claims_count_escalations_and_capacity(client: Client, settings: Settings) -> None:
    esc = settings.replace(
        escalations={"m1": Escalation("m1-fast", 3600)}, model_limits={"m1-fast": 7}
    )
    client.submit_batch([line("u1"), line("u2")], completion_window="30m")
    client.submit_batch([line("r")], completion_window="24h")
    seen = Samples()
    claimer.claim_all(client.store, esc, Recorder().publish)
    routed = "fusillade_requests_routed_to_escalation_total"
    assert seen.delta(routed, original_model="m1", escalation_model="m1-fast") == 2
    assert seen.now("fusillade_claim_capacity", model="m1-fast") == 7
    assert seen.now("fusillade_claim_capacity", model="m1") == settings.default_model_limit
    assert seen.delta("fusillade_claim_size_count") == 2  # one statement per queue
    assert seen.delta("fusillade_claim_duration_seconds_count") == 2


def test_maintenance_counts_what_it_ends(client: Client, settings: Settings) -> None:
    """The reaper's task_terminated failures, expiry's batch_expired ones, a cancelled
    batch (and its requests) as finalize closes it, purged rows."""
    now = time.time()
    poisoned = client.submit_batch([line("poison", model="mr")])
    client.store.heartbeat("dead", "host", 1, "model.mr", now)
    client.store.mark_worker_dead("dead", now)
    token, rows = client.store.claim("mr", "mr", 5, 5, now)
    client.store.start([rows[0].id], token, "dead", now)
    expiring = client.submit_batch([line(f"e{i}", model="me") for i in range(3)])
    cancelled = client.submit_batch([line(f"c{i}", model="mc") for i in range(4)])
    client.cancel_batch(cancelled)
    seen = Samples()

    assert maintenance.reap(client.store, settings.replace(max_retries=0)) == 1
    failed = "fusillade_requests_failed_total"
    assert seen.delta(failed, model="mr", reason="task_terminated", status_code="none") == 1
    assert states(client.store, poisoned) == {"poison": "failed"}

    maintenance.finalize(client.store, settings, now=now + 2 * 86400)
    assert seen.delta(failed, model="me", reason="batch_expired", status_code="none") == 3
    assert client.get_batch(expiring)["status"] == "expired"
    assert client.get_batch(cancelled)["status"] == "cancelled"
    assert seen.delta("fusillade_batches_cancelled_total") == 1
    assert seen.delta("fusillade_requests_cancelled_total") == 4
    maintenance.finalize(client.store, settings, now=now + 2 * 86400)  # closed once
    assert seen.delta("fusillade_batches_cancelled_total") == 1

    client.delete_batch(cancelled)
    purged = sum(n for _, n in maintenance.purge(client.store, settings, sleep=lambda _: None))
    assert purged == 4 and seen.delta("fusillade_rows_purged_total") == 4


def test_a_request_completed_after_its_deadline_counts_as_after_the_sla(
    client: Client, settings: Settings
) -> None:
    late = settings.replace(stop_before_deadline_ms=-3_600_000)  # send past the deadline
    batch_id = client.submit_batch([line("late", model="ml")], completion_window="1s")
    deadline = client.get_batch(batch_id)["expires_at"]
    wait_for(lambda: time.time() > deadline, 5, what="the deadline to pass")
    seen = Samples()
    rec = Recorder()
    claimer.claim_all(client.store, late, rec.publish)
    run_claimed(client.store, late, rec)
    assert states(client.store, batch_id) == {"late": "completed"}
    assert seen.delta("fusillade_requests_completed_after_sla_total") == 1


def test_the_status_line_shows_in_flight_and_what_ended_since_the_last_line(
    client: Client, settings: Settings
) -> None:
    status = metrics.StatusLog(metrics.registry(), 30.0)
    client.submit_batch([line("a", model="ms"), line("b", model="ms", mock_statuses=[400])])
    rec = Recorder()
    claimer.claim_all(client.store, settings, rec.publish)
    run_claimed(client.store, settings, rec)
    first = status.line()
    assert re.search(r"in flight \([^)]*\bms=0\b", first), first
    assert re.search(r"completed \([^)]*\bms=1\b", first), first
    assert re.search(r"failed \([^)]*\bms=1\b", first), first
    second = status.line()  # nothing ended since the first line
    assert "ms=" not in second.split(";", 1)[1], second


@pytest.mark.parametrize(
    ("argv", "prefork"),
    [
        (["celery", "-A", "fusillade_celery", "worker", "-Q", "model.a"], True),
        (["celery", "-A", "fusillade_celery", "worker", "-P", "prefork", "-c", "2"], True),
        (["celery", "-A", "fusillade_celery", "worker", "--pool=processes"], True),
        (["celery", "-A", "fusillade_celery", "worker", "-P", "gevent", "-c", "64"], False),
        (["celery", "-A", "fusillade_celery", "worker", "-Pthreads"], False),
        (["celery", "-A", "fusillade_celery", "worker", "--pool", "solo"], False),
        (["celery", "-A", "fusillade_celery", "beat"], False),
        (["fusillade-celery", "run", "in.jsonl"], False),
    ],
)
def test_multiprocess_mode_is_for_prefork_workers_only(argv: list[str], prefork: bool) -> None:
    assert metrics.prefork_worker(argv) is prefork


def _values(collector: ClusterCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        for s in family.samples
    }


def test_the_exporter_reads_queue_depth_batches_and_workers_cached(
    client: Client, settings: Settings
) -> None:
    clock = [0.0]
    collector = ClusterCollector(client.store, settings, cache_s=5.0, clock=lambda: clock[0])
    done = client.submit_batch([line("d", model="q1")])
    client.store.cancel_batch(done, time.time())
    maintenance.finalize(client.store, settings)
    client.submit_batch([line(f"p{i}", model="q1") for i in range(3)])
    client.store.claim("q1", "q1", 1, 1, time.time())
    client.store.heartbeat("w-alive", "host", 1, "model.q1", time.time())
    client.store.heartbeat("w-old", "host", 2, "model.q1", time.time() - 3600)
    v = _values(collector)

    def depth(state: str) -> float:
        return v["fusillade_queue_depth", (("model", "q1"), ("state", state))]

    assert (depth("pending"), depth("claimed"), depth("processing")) == (2, 1, 0)
    assert v["fusillade_batches", (("status", "in_progress"),)] == 1
    assert v["fusillade_batches", (("status", "cancelled"),)] == 1
    assert v["fusillade_batches", (("status", "expired"),)] == 0
    assert v["fusillade_workers_alive", ()] == 1
    assert v["fusillade_exporter_up", ()] == 1

    client.submit_batch([line("later", model="q1")])
    assert _values(collector)["fusillade_queue_depth", (("model", "q1"), ("state", "pending"))] == 2
    clock[0] += 5.0  # the cache has expired: read again
    assert _values(collector)["fusillade_queue_depth", (("model", "q1"), ("state", "pending"))] == 3


def _exported_names() -> set[str]:
    """Every sample name the workers and the exporter can produce."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    families = [f for f in metrics.REGISTRY.collect() if f.name.startswith("fusillade_")]
    families += list(ClusterCollector(cast(Store, None), Settings()).describe())
    return {f.name + suffix for f in families for suffix in suffixes[f.type]}


def test_every_metric_issue_15_names_is_exported() -> None:
    wanted = [
        "fusillade_requests_completed_total",
        "fusillade_requests_failed_total",
        "fusillade_requests_in_flight",
        "fusillade_claim_duration_seconds_bucket",
        "fusillade_claim_size_count",
        "fusillade_claim_capacity",
        "fusillade_request_duration_seconds_bucket",
        "fusillade_retry_attempts_on_success_bucket",
        "fusillade_requests_routed_to_escalation_total",
        "fusillade_requests_cancelled_total",
        "fusillade_batches_cancelled_total",
        "fusillade_rows_purged_total",
        "fusillade_heartbeat_duration_seconds_bucket",
        "fusillade_requests_completed_after_sla_total",
        "fusillade_queue_depth",
        "fusillade_batches",
        "fusillade_workers_alive",
    ]
    assert set(wanted) - _exported_names() == set()


def test_the_dashboard_queries_only_metrics_the_code_exports() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/fusillade-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bfusillade_[a-z0-9_]+", expr)}
    assert len(exprs) >= 8 and used
    assert used - _exported_names() == set()
    scrape = (ROOT / "deploy/prometheus.yml").read_text()
    assert "9464" in scrape and "exporter:9465" in scrape
