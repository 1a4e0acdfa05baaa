"""End to end on real processes: limits, retries, deadline, headers, secrets, formats, cancel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from fusillade_celery.settings import Settings

from ..conftest import line
from ..services import wait_for
from .conftest import API_KEY, Cluster

pytestmark = pytest.mark.integration


def per_worker_peaks(cluster: Cluster, batch_id: str) -> dict[str, int]:
    """Most upstream calls of the batch in flight at once, per worker process (each call's
    worker read from the row it was for)."""
    rows = {r["id"]: r["worker_id"] for r in cluster.client.store.request_rows(batch_id)}
    events: dict[str, list[tuple[float, int]]] = {}
    for call in cluster.mock_stats()["log"]:
        worker = rows.get(int(call["headers"]["x-fusillade-request-id"]))
        if worker is not None:
            events.setdefault(worker, []).extend([(call["start"], 1), (call["end"], -1)])
    peaks = {}
    for worker, changes in events.items():
        running = peaks[worker] = 0
        for _, change in sorted(changes):
            running += change
            peaks[worker] = max(peaks[worker], running)
    return peaks


def test_model_limit_holds_across_two_workers(cluster: Cluster) -> None:
    """Model limits of 5 and 30 against two workers of -c 20: each model's concurrent
    upstream calls reach its limit and never pass it, counted across both processes (the
    claimer's counted claims and every worker's hand-offs of freed slots at once), and 30,
    more than one worker runs, is run by both. A limit of 50 is more than both together
    run: there each worker's own -c is the bound (invariant 4, per worker)."""
    sizes = {"limited": 150, "wide": 300, "wider": 400}
    batches = {
        model: cluster.client.submit_batch(
            [line(f"{model}-{i}", model=model, mock_latency_ms=100) for i in range(n)]
        )
        for model, n in sizes.items()
    }
    for model, batch_id in batches.items():
        batch = cluster.wait_done(batch_id, 90)
        total = sizes[model]
        assert batch["request_counts"] == {"total": total, "completed": total, "failed": 0}
    peak = cluster.mock_stats()["peak_concurrency"]
    assert (peak["limited"], peak["wide"]) == (5, 30)
    assert peak["wider"] <= 40
    wide = per_worker_peaks(cluster, batches["wide"])
    assert len(wide) == 2, f"both workers should have run 'wide': {wide}"
    wider = per_worker_peaks(cluster, batches["wider"])
    assert len(wider) == 2 and max(wider.values()) <= 20, wider


def test_retry_semantics(cluster: Cluster) -> None:
    batch_id = cluster.client.submit_batch(
        [
            line("rt-503x2", mock_statuses=[503, 503, 200]),
            line("rt-400", mock_statuses=[400]),
            line("rt-reset", mock_reset=1),
            line("rt-timeout", mock_stall_ms=4000),
            line("rt-backoff", mock_statuses=[503, 503, 503, 503, 200]),
        ]
    )
    batch = cluster.wait_done(batch_id, 60)
    rows = {r["custom_id"]: r for r in cluster.client.store.request_rows(batch_id)}
    calls = cluster.calls_for("rt-")
    assert rows["rt-503x2"]["state"] == "completed" and len(calls["rt-503x2"]) == 3
    assert rows["rt-400"]["state"] == "failed" and len(calls["rt-400"]) == 1
    assert rows["rt-reset"]["state"] == "completed" and len(calls["rt-reset"]) == 2
    assert rows["rt-timeout"]["state"] == "completed" and len(calls["rt-timeout"]) == 2
    assert batch["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    # measured backoff: 200 ms * 2 ** attempt, capped at 2000 ms
    starts = [c["start"] for c in calls["rt-backoff"]]
    ends = [c["end"] for c in calls["rt-backoff"]]
    assert len(starts) == 5
    for attempt in range(4):
        expected = min(0.2 * 2**attempt, 2.0)
        gap = starts[attempt + 1] - ends[attempt]
        assert expected - 0.02 <= gap <= expected + 0.5, (attempt, gap)


def test_always_503_fails_by_the_deadline_without_calls_after_expiry(cluster: Cluster) -> None:
    batch_id = cluster.client.submit_batch(
        [line(f"dl-{i}", model="m2", mock_statuses=[503]) for i in range(5)], completion_window="4s"
    )
    batch = cluster.wait_done(batch_id, 30)
    assert batch["status"] in ("failed", "expired")
    assert batch["request_counts"] == {"total": 5, "completed": 0, "failed": 5}
    rows = cluster.client.store.request_rows(batch_id)
    expires_at = batch["expires_at"]
    assert rows[0]["deadline"] == expires_at  # the deadline enforced is the one shown
    calls = cluster.calls_for("dl-")
    assert sum(len(c) for c in calls.values()) >= 5 * 3  # retried several times each
    for cid, cs in calls.items():
        assert all(c["start"] < expires_at for c in cs), cid
    time.sleep(1.0)  # no straggler retry lands after the batch ended
    assert sum(len(c) for c in cluster.calls_for("dl-").values()) == sum(
        len(c) for c in calls.values()
    )
    errors = list(cluster.client.iter_results(batch_id, errors=True))
    # retries denied by the deadline; a retry due before it whose countdown ran late (a busy
    # machine) is not sent and ends batch_expired
    assert {e["error"]["code"] for e in errors} <= {"retriable_http_status", "batch_expired"}


def _monitor(url: str, seen: list[str], stop: threading.Event) -> None:
    r = redis.Redis.from_url(url)
    with r.monitor() as m:
        for cmd in m.listen():
            seen.append(str(cmd.get("command", "")))
            if stop.is_set():
                return


def test_headers_reach_the_upstream_and_the_key_stays_secret(cluster: Cluster) -> None:
    seen: list[str] = []
    stop = threading.Event()
    mon = threading.Thread(target=_monitor, args=(cluster.broker_url, seen, stop), daemon=True)
    mon.start()
    time.sleep(0.3)
    batch_id = cluster.client.submit_batch(
        [line(f"hd-{i}", model="m1") for i in range(10)]
        + [line("hd-fail", model="m1", mock_statuses=[401])]
    )
    cluster.wait_done(batch_id, 60)
    stop.set()
    redis.Redis.from_url(cluster.broker_url).ping()  # one more command wakes the monitor
    mon.join(10)
    rows = {r["custom_id"]: r for r in cluster.client.store.request_rows(batch_id)}
    batch = cluster.client.get_batch(batch_id)
    for cid, calls in cluster.calls_for("hd-").items():
        h = calls[0]["headers"]
        assert h["authorization"] == f"Bearer {API_KEY}"
        assert h["x-fusillade-request-id"] == str(rows[cid]["id"])
        assert h["x-fusillade-custom-id"] == cid
        assert h["x-fusillade-batch-id"] == batch_id
        assert h["x-fusillade-batch-endpoint"] == "/v1/chat/completions"
        assert h["x-fusillade-batch-completion-window"] == "24h"
        assert h["x-fusillade-batch-created-at"] == str(batch["created_at"])
    broker_traffic = "\n".join(seen)
    assert "fusillade.execute" in broker_traffic  # the monitor saw the messages
    assert API_KEY not in broker_traffic
    assert '"messages"' not in broker_traffic  # no request body travels through the broker
    logs = cluster.logs()
    assert "fusillade.execute" in logs and API_KEY not in logs
    errors = list(cluster.client.iter_results(batch_id, errors=True))
    assert API_KEY not in json.dumps(errors)


def test_status_walk_and_openai_formats(cluster: Cluster) -> None:
    batch_id = cluster.client.submit_batch(
        [line(f"fmt-{i}", model="m2", mock_latency_ms=150) for i in range(30)]
        + [line("fmt-bad", model="m2", mock_statuses=[422])],
        metadata={"purpose": "format-test"},
    )
    order = ["validating", "in_progress", "finalizing", "completed"]
    statuses: list[str] = []
    partial_seen = False

    def poll() -> bool:
        nonlocal partial_seen
        b = cluster.client.get_batch(batch_id)
        if not statuses or statuses[-1] != b["status"]:
            statuses.append(b["status"])
        if b["status"] == "in_progress" and 0 < b["request_counts"]["completed"] < 30:
            partial_seen = partial_seen or bool(list(cluster.client.iter_results(batch_id)))
        return b["status"] == "completed"

    wait_for(poll, 60, interval=0.05, what="format batch to complete")
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)
    assert partial_seen, "results should be readable while the batch runs"
    b = cluster.client.get_batch(batch_id)
    assert b["created_at"] <= b["in_progress_at"] <= b["finalizing_at"] <= b["completed_at"]
    assert b["request_counts"] == {"total": 31, "completed": 30, "failed": 1}
    assert b["metadata"] == {"purpose": "format-test"} and b["object"] == "batch"
    out = list(cluster.client.iter_file(b["output_file_id"]))
    assert len(out) == 30
    for o in out:
        assert set(o) == {"id", "custom_id", "response", "error"} and o["error"] is None
        assert o["id"].startswith("batch_req_") and o["response"]["status_code"] == 200
        assert o["response"]["body"]["object"] == "chat.completion"
    (err,) = list(cluster.client.iter_file(b["error_file_id"]))
    assert err["custom_id"] == "fmt-bad" and err["response"]["status_code"] == 422
    assert err["error"]["code"] == "non_retriable_http_status"


def test_cancel_stops_new_calls_and_keeps_finished_results(cluster: Cluster) -> None:
    batch_id = cluster.client.submit_batch(
        [line(f"cx-{i:03d}", model="m2", mock_latency_ms=300) for i in range(200)]
    )
    wait_for(lambda: cluster.client.get_batch(batch_id)["request_counts"]["completed"] >= 10, 30)
    cancel_at = time.time()
    assert cluster.client.cancel_batch(batch_id)["status"] in ("cancelling", "cancelled")
    batch = cluster.wait_done(batch_id, 30)
    assert batch["status"] == "cancelled"
    counts = batch["request_counts"]
    assert counts["completed"] >= 10 and counts["completed"] + counts["failed"] == 200
    late = [
        c for cs in cluster.calls_for("cx-").values() for c in cs if c["start"] > cancel_at + 0.5
    ]
    assert late == [], "no upstream call may start after the cancel"
    assert len(list(cluster.client.iter_results(batch_id))) == counts["completed"]
    assert {e["error"]["code"] for e in cluster.client.iter_results(batch_id, errors=True)} == {
        "batch_cancelled"
    }


def test_cli_run_follows_a_distributed_batch(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "dist.jsonl"
    src.write_text("".join(json.dumps(line(f"cli-{i}", model="m1")) + "\n" for i in range(20)))
    res = subprocess.run(
        [sys.executable, "-m", "fusillade_celery.cli", "run", str(src)],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "completed: 20 completed, 0 failed" in res.stdout
    assert len((tmp_path / "dist.output.jsonl").read_text().splitlines()) == 20
    assert API_KEY not in res.stdout + res.stderr


def test_settings_in_the_cluster_env_parse(cluster: Cluster) -> None:
    s: Any = Settings.from_env(cluster.env)
    assert s.limit_for("limited") == 5 and not s.embedded
    assert os.environ.get("FUSILLADE_BROKER_URL") is None  # the test process env is untouched


def test_flower_shows_tasks_with_ids_only(cluster: Cluster) -> None:
    import requests

    from ..services import free_port

    port = free_port()
    env = {**cluster.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    log = (cluster.log_dir / "flower.log").open("wb")
    flower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "fusillade_celery",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(base + "/api/workers", timeout=2).ok, 30, what="flower")
        # Flower subscribes to task events asynchronously after it starts serving HTTP: keep
        # sending small batches until its task view has picked some up.
        sent: list[str] = []

        def listed() -> list[dict[str, Any]]:
            seen = [
                t
                for t in requests.get(base + "/api/tasks", timeout=5).json().values()
                if t.get("name") == "fusillade.execute" and t.get("state") == "SUCCESS"
            ]
            if not seen:
                batch_id = cluster.client.submit_batch(
                    [line(f"fl-{len(sent)}-{i}", model="m1") for i in range(3)]
                )
                sent.append(batch_id)
                cluster.wait_done(batch_id, 30)
            return seen

        tasks = wait_for(listed, 60, interval=0.5, what="flower to list execute tasks")
        shown = json.dumps(tasks)
        assert "'m1'" in shown  # args are (model, token, [ids])
        assert API_KEY not in shown and "messages" not in shown
    finally:
        flower.terminate()
        flower.wait(20)


def test_cancel_closes_in_flight_calls_within_a_second(cluster: Cluster) -> None:
    """The workers' cancel poll runs every 5 s here (the default); the cancel broadcast is
    what closes the in-flight upstream calls of a cancelled batch within a second of
    ``cancel_batch`` returning (invariant 6, ``control.py``)."""
    n = 20
    batch_id = cluster.client.submit_batch(
        [line(f"bc-{i:02d}", model="wide", mock_latency_ms=30000) for i in range(n)]
    )
    wait_for(
        lambda: cluster.mock_stats()["in_flight"].get("wide", 0) == n,
        30,
        what="every slow call in flight",
    )
    cluster.client.cancel_batch(batch_id)
    returned = time.time()
    wait_for(
        lambda: all(
            e.get("outcome") == "disconnected"
            for cs in cluster.calls_for("bc-").values()
            for e in cs
        ),
        10,
        what="the upstream to see every connection closed",
    )
    closed = [e["end"] - returned for cs in cluster.calls_for("bc-").values() for e in cs]
    assert len(closed) == n
    print(f"cancel broadcast: calls closed {max(closed) * 1000:.0f} ms after cancel returned")
    assert max(closed) < 1.0
    assert cluster.wait_done(batch_id, 30)["status"] == "cancelled"


def test_cli_run_again_follows_the_batch_instead_of_submitting_it_twice(
    cluster: Cluster, tmp_path: Path
) -> None:
    """``run`` with a broker, interrupted with Ctrl-C, says the batch carries on in the
    cluster; the same command again follows that batch (found by content) and writes its
    results. Every line reaches the upstream once, not once per run."""
    import signal

    n = 60
    src = tmp_path / "again.jsonl"
    src.write_text(
        "".join(
            json.dumps(line(f"ag-{i:02d}", model="m1", mock_latency_ms=400)) + "\n"
            for i in range(n)
        )
    )
    cmd = [sys.executable, "-m", "fusillade_celery.cli", "run", str(src), "-q"]
    first = subprocess.Popen(
        cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: len(cluster.calls_for("ag-")) >= 10, 60, what="the first calls")
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=30)
    assert first.returncode == 130, err
    assert "carries on in the cluster" in err and "fusillade-celery cancel batch_" in err
    again = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "following batch_" in again.stderr and "submitted" not in again.stderr
    assert f"completed: {n} completed, 0 failed" in again.stdout
    assert len((tmp_path / "again.output.jsonl").read_text().splitlines()) == n
    calls = cluster.calls_for("ag-")
    assert len(calls) == n and all(len(c) == 1 for c in calls.values())
