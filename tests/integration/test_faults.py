"""Faults injected for real on a running cluster: kill -9 a worker, flush Redis, restart beat,
terminate PostgreSQL backends, duplicate deliveries, cancel with a slow upstream, expiry with
no worker. Every request must end exactly once with a response the upstream really sent."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from fusillade_celery.tasks import publish_execute

from ..conftest import line
from ..services import wait_for
from .conftest import Cluster, Processes, running_cluster
from .outage_checks import completed

pytestmark = pytest.mark.integration

FAULT_MODELS = ("f1", "f2", "fc")


@pytest.fixture(scope="module")
def faults(
    pg_admin: str, pg_template: str, redis_base: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Processes]]:
    with running_cluster(
        pg_admin,
        pg_template,
        redis_base,
        tmp_path_factory.mktemp("faults"),
        redis_db=13,
        models=FAULT_MODELS,
        env_extra={
            "FUSILLADE_MODEL_LIMITS": "f1=60,f2=20,fc=60",
            "FUSILLADE_HEARTBEAT_INTERVAL_MS": "500",
            "FUSILLADE_STALE_WORKER_THRESHOLD_MS": "3000",
            "FUSILLADE_CLAIM_TIMEOUT_MS": "5000",
            "FUSILLADE_PROCESSING_TIMEOUT_MS": "60000",
            "FUSILLADE_CANCELLATION_POLL_INTERVAL_MS": "1000",
            "FUSILLADE_TIMEOUT_MS": "60000",
        },
    ) as cp:
        yield cp


def assert_exactly_once_with_real_responses(c: Cluster, batch_id: str, prefix: str, n: int) -> None:
    """Every request completed once, each stored response one the upstream really returned
    for that custom_id (its mock sequence id is in the mock's log for that custom_id)."""
    out = list(c.client.iter_results(batch_id))
    ids = [o["custom_id"] for o in out]
    assert len(ids) == n and len(set(ids)) == n
    assert list(c.client.iter_results(batch_id, errors=True)) == []
    served: dict[str, set[str]] = {}
    for cid, calls in c.calls_for(prefix).items():
        served[cid] = {f"chatcmpl-mock-{e['seq']}" for e in calls if e.get("outcome") == "ok"}
    for o in out:
        body = o["response"]["body"]
        assert body["id"] in served[o["custom_id"]], o["custom_id"]
        assert f"reply to {o['custom_id']} " in body["choices"][0]["message"]["content"]


def test_kill_9_a_worker_mid_batch(faults: tuple[Cluster, Processes]) -> None:
    c, procs = faults
    n = 1500
    batch_id = c.client.submit_batch(
        [line(f"k9-{i:04d}", model="f1", mock_latency_ms=200) for i in range(n)]
    )
    wait_for(lambda: completed(c, batch_id) >= 300, 60, what="progress before the kill")
    procs.kill("w1", signal.SIGKILL)
    assert completed(c, batch_id) < n
    procs.start_worker("w1b")  # the replacement
    batch = c.wait_done(batch_id, 120)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    assert_exactly_once_with_real_responses(c, batch_id, "k9-", n)


def test_flushing_redis_mid_batch(faults: tuple[Cluster, Processes]) -> None:
    c, _ = faults
    n = 600
    batch_id = c.client.submit_batch(
        [line(f"fl-{i:04d}", model="f1", mock_latency_ms=100) for i in range(n)]
    )
    wait_for(lambda: completed(c, batch_id) >= 100, 60, what="progress before the flush")
    redis.Redis.from_url(c.broker_url).flushdb()
    batch = c.wait_done(batch_id, 120)
    assert batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    assert_exactly_once_with_real_responses(c, batch_id, "fl-", n)


def test_restarting_beat_and_terminating_db_backends(faults: tuple[Cluster, Processes]) -> None:
    c, procs = faults
    n = 600
    batch_id = c.client.submit_batch(
        [line(f"bt-{i:04d}", model="f1", mock_latency_ms=100) for i in range(n)]
    )
    wait_for(lambda: completed(c, batch_id) >= 100, 60, what="progress before beat dies")
    procs.kill("beat", signal.SIGKILL)
    time.sleep(1.0)  # a stretch with no beat at all
    procs.start_beat()
    wait_for(lambda: completed(c, batch_id) >= 300, 60, what="progress before the backends die")
    db = c.settings.database_url.rsplit("/", 1)[1]
    admin = c.settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (db,),
        ).fetchone()
    assert killed and killed[0] > 0
    batch = c.wait_done(batch_id, 120)
    assert batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    assert_exactly_once_with_real_responses(c, batch_id, "bt-", n)


def test_duplicate_delivery_changes_nothing(faults: tuple[Cluster, Processes]) -> None:
    c, _ = faults
    batch_id = c.client.submit_batch(
        [line(f"dup-{i:02d}", model="f2", mock_latency_ms=800) for i in range(20)]
    )
    rows = wait_for(
        lambda: (
            (rs := [r for r in c.client.store.request_rows(batch_id) if r["claim_token"]])
            and len(rs) == 20
            and rs
        ),
        30,
        what="all requests claimed",
    )
    for r in rows:  # the same message, published twice more
        publish_execute("f2", r["claim_token"], [r["id"]])
        publish_execute("f2", r["claim_token"], [r["id"]])
    c.wait_done(batch_id, 60)
    finished = {r["id"]: r for r in c.client.store.request_rows(batch_id)}
    for r in finished.values():  # and once more after the end
        publish_execute("f2", r["claim_token"], [r["id"]])
    time.sleep(1.5)  # give the late duplicates time to be consumed (they must change nothing)
    assert {r["id"]: r for r in c.client.store.request_rows(batch_id)} == finished
    calls = c.calls_for("dup-")
    assert all(len(cs) <= 2 for cs in calls.values())
    assert_exactly_once_with_real_responses(c, batch_id, "dup-", 20)


def test_cancel_aborts_in_flight_calls(faults: tuple[Cluster, Processes]) -> None:
    c, _ = faults
    fast = [line(f"cf-{i:02d}", model="fc") for i in range(10)]
    slow = [line(f"cs-{i:02d}", model="fc", mock_latency_ms=30000) for i in range(30)]
    batch_id = c.client.submit_batch(fast + slow)
    wait_for(
        lambda: completed(c, batch_id) == 10 and c.mock_stats()["in_flight"].get("fc", 0) == 30,
        30,
        what="fast lines done and the 30 slow ones in flight",
    )
    cancelled_at = time.time()
    c.client.cancel_batch(batch_id)
    wait_for(
        lambda: all(
            e.get("outcome") == "disconnected" for cs in c.calls_for("cs-").values() for e in cs
        ),
        10,
        what="the upstream to see every slow connection closed",
    )
    closed = [e["end"] for cs in c.calls_for("cs-").values() for e in cs]
    assert len(closed) == 30
    assert max(closed) - cancelled_at <= 1.0 + 2.0  # poll interval + 2 s
    batch = c.wait_done(batch_id, 30)
    assert batch["status"] == "cancelled"
    states = {r["custom_id"]: r["state"] for r in c.client.store.request_rows(batch_id)}
    assert {states[f"cs-{i:02d}"] for i in range(30)} == {"canceled"}
    assert sorted(o["custom_id"] for o in c.client.iter_results(batch_id)) == sorted(
        x["custom_id"] for x in fast
    )


def test_expiry_with_no_worker_for_the_model(faults: tuple[Cluster, Processes]) -> None:
    c, _ = faults
    batch_id = c.client.submit_batch(
        [line(f"nw-{i}", model="nobody-serves-this") for i in range(5)], completion_window="3s"
    )
    batch = c.wait_done(batch_id, 30)
    assert batch["status"] == "expired"
    assert batch["request_counts"] == {"total": 5, "completed": 0, "failed": 5}
    errors = list(c.client.iter_file(batch["error_file_id"]))
    assert [e["error"]["code"] for e in errors] == ["batch_expired"] * 5
    assert c.calls_for("nw-") == {}


def test_sigterm_hands_work_back(faults: tuple[Cluster, Processes]) -> None:
    c, procs = faults
    n = 300
    batch_id = c.client.submit_batch(
        [line(f"st-{i:03d}", model="f1", mock_latency_ms=300) for i in range(n)]
    )
    wait_for(lambda: completed(c, batch_id) >= 30, 60, what="progress before SIGTERM")
    victim = next(iter(k for k in procs.c.procs if k.startswith("w")))
    procs.kill(victim, signal.SIGTERM)  # warm shutdown: in-flight requests finish
    workers: list[dict[str, Any]] = c.client.store.worker_rows()
    assert any(w["status"] == "dead" for w in workers)
    # Each worker advertises its -c (what the claimer sizes messages to).
    assert {w["concurrency"] for w in workers if w["status"] == "alive"} == {20}
    batch = c.wait_done(batch_id, 120)
    assert batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    assert_exactly_once_with_real_responses(c, batch_id, "st-", n)
    procs.start_worker(victim + "b")
    json.dumps(workers)  # rows are plain data


@pytest.mark.parametrize("pool", ["gevent", "threads"])
def test_redis_restart_mid_batch(
    pg_admin: str, pg_template: str, tmp_path_factory: pytest.TempPathFactory, pool: str
) -> None:
    """A private redis-server, killed and started again on the same port mid-batch (it keeps
    nothing on disk, so queued messages are lost too): no process is restarted. Relies on the
    kombu workaround in ``compat.py``; without it the worker's consumer dies on reconnect."""
    import shutil
    import subprocess

    from ..services import free_port

    binary = shutil.which("redis-server")
    assert binary, "redis-server must be installed (Debian: apt-get install redis-server)"
    port = free_port()

    def start_redis() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for(lambda: redis.Redis(port=port).ping(), 10, what="redis-server")
        return proc

    server = start_redis()
    try:
        with running_cluster(
            pg_admin,
            pg_template,
            f"redis://127.0.0.1:{port}",
            tmp_path_factory.mktemp("redis-restart"),
            redis_db=0,
            models=("r1",),
            env_extra={
                "FUSILLADE_MODEL_LIMITS": "r1=40",
                "FUSILLADE_CLAIM_TIMEOUT_MS": "5000",
                "FUSILLADE_STALE_WORKER_THRESHOLD_MS": "3000",
                "FUSILLADE_HEARTBEAT_INTERVAL_MS": "500",
            },
            workers=1,
            pool=pool,
        ) as (c, _):
            n = 400
            batch_id = c.client.submit_batch(
                [line(f"rr-{i:03d}", model="r1", mock_latency_ms=100) for i in range(n)]
            )
            wait_for(lambda: completed(c, batch_id) >= 80, 60, what="progress before the restart")
            server.kill()
            server.wait(10)
            time.sleep(1.0)
            server = start_redis()
            batch = c.wait_done(batch_id, 120)
            assert batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
            assert_exactly_once_with_real_responses(c, batch_id, "rr-", n)
    finally:
        server.kill()
        server.wait(10)


def test_no_claims_for_a_model_no_worker_consumes(faults: tuple[Cluster, Processes]) -> None:
    """A batch for a model no worker consumes: nothing is claimed for its queue, so its
    length stays 0 over several claim timeouts (5 s here) instead of growing by one message
    each time the reaper took the rows back; ``status`` says that no worker consumes it."""
    import subprocess
    import sys

    c, _ = faults
    batch_id = c.client.submit_batch(
        [line(f"uc-{i}", model="unserved") for i in range(5)], completion_window="1h"
    )
    r = redis.Redis.from_url(c.broker_url)
    lengths = []
    until = time.monotonic() + 12.0  # more than two claim timeouts
    while time.monotonic() < until:
        lengths.append(r.llen("model.unserved"))
        time.sleep(0.5)
    assert max(lengths) == 0
    assert {row["state"] for row in c.client.store.request_rows(batch_id)} == {"pending"}
    res = subprocess.run(
        [sys.executable, "-m", "fusillade_celery.cli", "status", batch_id],
        env=c.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "no live worker consumes model.unserved" in res.stderr
    c.client.cancel_batch(batch_id)


def test_no_call_at_or_after_the_deadline_on_a_busy_machine(
    faults: tuple[Cluster, Processes],
) -> None:
    """Two CPU hogs beside the workers, an 8 s window, 20 always-503 requests and 5 good
    ones: retries due just before the deadline run late and slots of failing rows free as
    the deadline nears, yet no call starts at or after the ``expires_at`` the Batch object
    shows (invariant 5)."""
    import subprocess
    import sys

    hogs = [
        subprocess.Popen(
            [sys.executable, "-c", "import time\nt=time.time()+40\nwhile time.time()<t: pass"]
        )
        for _ in range(2)
    ]
    c, _ = faults
    try:
        lines = [line(f"dl-bad-{i:02d}", model="f2", mock_statuses=[503]) for i in range(20)]
        lines += [line(f"dl-ok-{i}", model="f2", mock_latency_ms=100) for i in range(5)]
        batch_id = c.client.submit_batch(lines, completion_window="8s")
        expires_at = c.client.get_batch(batch_id)["expires_at"]
        batch = c.wait_done(batch_id, 60)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(10)
    assert batch["status"] == "expired" or batch["request_counts"]["failed"] == 20
    calls = [e for cs in c.calls_for("dl-").values() for e in cs]
    late = [e for e in calls if e["start"] >= expires_at]
    print(f"{len(calls)} calls, {len(late)} at or after expires_at")
    assert late == []
    assert batch["request_counts"]["completed"] == 5
