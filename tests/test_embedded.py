"""The embedded default: SQLite file, in-process broker and a real Celery worker thread; the
CLI's ``run`` (with resume after Ctrl-C) and ``demo`` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import event

from fusillade_celery.db import get_engine
from fusillade_celery.embedded import run_batch
from fusillade_celery.migrate import upgrade
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.settings import Settings
from fusillade_celery.store import Store
from fusillade_celery.submit import Client

from .conftest import line
from .services import wait_for

CLI = [sys.executable, "-m", "fusillade_celery.cli"]


def test_run_batch_in_process(sqlite_url: str, mock: MockUpstream) -> None:
    settings = Settings().replace(
        database_url=sqlite_url,
        upstream_url=mock.url,
        upstream_api_key="k",
        backoff_ms=50,
        model_limits={"a": 4, "b": 2},
    )
    client = Client(settings)
    lines = [line(f"r{i}", model="ab"[i % 2]) for i in range(40)]
    lines.append(line("flaky", model="a", mock_statuses=[503, 503, 200]))
    batch_id = client.submit_batch(lines)
    seen: list[int] = []
    batch = run_batch(
        client, batch_id, on_progress=lambda b: seen.append(b["request_counts"]["completed"])
    )
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 41, "completed": 41, "failed": 0}
    assert mock.state.by_custom_id["flaky"] == 3
    assert seen == sorted(seen) and seen[-1] == 41
    assert mock.state.peak["a"] <= 4 and mock.state.peak["b"] <= 2


def test_embedded_concurrency_is_the_sum_of_the_limits(sqlite_url: str, mock: MockUpstream) -> None:
    """A model limit of 200 runs 200 requests at once in one embedded process (it peaked at
    64, a cap ``run --help`` did not mention)."""
    settings = Settings().replace(
        database_url=sqlite_url, upstream_url=mock.url, model_limits={"big": 200}
    )
    client = Client(settings)
    batch_id = client.submit_batch(
        [line(f"c{i}", model="big", mock_latency_ms=1500) for i in range(300)]
    )
    batch = run_batch(client, batch_id)
    assert batch["request_counts"] == {"total": 300, "completed": 300, "failed": 0}
    assert 150 < mock.state.peak["big"] <= 200


def test_two_batches_run_one_after_the_other_in_one_process(
    sqlite_url: str, mock: MockUpstream, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A script that runs a second batch in the same process (``cli.main`` twice): the first
    run's worker closed its broker connections when it stopped, and the second run must not
    publish through them ("Acquire on closed pool")."""
    from fusillade_celery.cli import main

    monkeypatch.setenv("FUSILLADE_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("FUSILLADE_UPSTREAM_URL", mock.url)
    monkeypatch.delenv("FUSILLADE_BROKER_URL", raising=False)
    for n in (1, 2):
        src = tmp_path / f"in{n}.jsonl"
        src.write_text("".join(json.dumps(line(f"run{n}-{i}")) + "\n" for i in range(5)))
        assert main(["run", "-q", str(src)]) == 0
    assert mock.state.calls == 10


def _start_mock(*flags: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*CLI, "mock-upstream", "--port", "0", *flags], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert "listening on" in first, first
    return proc, first.strip().rsplit(" ", 1)[1]


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _completed(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return int(
                conn.execute("SELECT count(*) FROM requests WHERE state='completed'").fetchone()[0]
            )
        except sqlite3.OperationalError:
            return 0


def test_cli_run_resumes_after_ctrl_c(tmp_path: Path) -> None:
    mock, url = _start_mock("--latency-ms", "100")
    try:
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps(line(f"r{i:03d}")) + "\n" for i in range(300)))
        db = tmp_path / "state.sqlite3"
        env = {
            **os.environ,
            "FUSILLADE_DATABASE_URL": f"sqlite:///{db}",
            "FUSILLADE_UPSTREAM_URL": url,
            "FUSILLADE_UPSTREAM_API_KEY": "sk-cli-key",
            "FUSILLADE_MODEL_LIMITS": "m1=10",
        }
        env.pop("FUSILLADE_BROKER_URL", None)
        first = subprocess.Popen(
            [*CLI, "run", str(src)], env=env, stderr=subprocess.PIPE, text=True
        )
        wait_for(lambda: _completed(db) >= 40, 60, what="the first run to make progress")
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=30)
        assert first.returncode == 130, err
        assert "run the same command again to resume" in err
        done_before = _completed(db)
        assert 40 <= done_before < 300
        second = subprocess.run(
            [*CLI, "run", str(src)], env=env, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 0, second.stderr
        assert "resuming batch_" in second.stderr
        out = [json.loads(x) for x in (tmp_path / "in.output.jsonl").read_text().splitlines()]
        assert sorted(o["custom_id"] for o in out) == [f"r{i:03d}" for i in range(300)]
        assert (tmp_path / "in.errors.jsonl").read_text() == ""
        assert "completed: 300 completed, 0 failed" in second.stdout
        assert "sk-cli-key" not in second.stdout + second.stderr + err
    finally:
        stop(mock)


def test_ctrl_c_does_not_wait_for_slow_upstream_calls(tmp_path: Path) -> None:
    import requests

    mock, url = _start_mock("--latency-ms", "60000")
    try:
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps(line(f"s{i}")) + "\n" for i in range(20)))
        env = {
            **os.environ,
            "FUSILLADE_DATABASE_URL": f"sqlite:///{tmp_path / 'state.sqlite3'}",
            "FUSILLADE_UPSTREAM_URL": url,
            "FUSILLADE_MODEL_LIMITS": "m1=5",
        }
        env.pop("FUSILLADE_BROKER_URL", None)
        run = subprocess.Popen([*CLI, "run", str(src)], env=env, stderr=subprocess.PIPE, text=True)
        wait_for(
            lambda: (
                requests.get(url + "/_mock/stats", timeout=5).json()["in_flight"].get("m1") == 5
            ),
            60,
            what="five one-minute calls in flight",
        )
        run.send_signal(signal.SIGINT)
        # Exits while its calls still have most of a minute to go (a warm stop would wait).
        _, err = run.communicate(timeout=20)
        assert run.returncode == 130, err
        assert "run the same command again to resume" in err
    finally:
        stop(mock)


def test_demo_runs_a_real_batch_of_two_models(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    res = subprocess.run(
        [*CLI, "demo", "--out", str(out_dir), "--requests", "1000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["status"] == "completed"
    counts = summary["request_counts"]
    assert counts["total"] == 1000 and counts["completed"] + counts["failed"] == 1000
    assert counts["failed"] > 0  # the sample asks the mock for some permanent failures
    assert summary["upstream_calls"] > 1000  # and for transient ones, which are retried
    outputs = [json.loads(x) for x in (out_dir / "output.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (out_dir / "errors.jsonl").read_text().splitlines()]
    assert len(outputs) == counts["completed"] and len(errors) == counts["failed"]
    assert {o["response"]["body"]["model"] for o in outputs} == {"demo-small", "demo-large"}
    assert "req" in res.stderr and "1000/1000" in res.stderr  # the progress bar reached the end


def test_writers_of_one_process_take_turns_instead_of_waiting_in_sqlite(sqlite_url: str) -> None:
    """Embedded mode writes one SQLite file through two engines (the client's, the worker's)
    from many threads. SQLite makes a writer that finds the file locked sleep and retry, 1 ms
    and then longer however soon the file is free (60 ms a write-back on average with 32
    threads, benchmark "embedded"); the process's writers take turns on a lock of their own
    instead. With SQLite's busy timeout at 0 a writer that met the file locked would fail at
    once ("database is locked"): none does."""
    engines = [get_engine(sqlite_url), get_engine(sqlite_url, pre_ping=False)]
    upgrade(engines[0])
    for engine in engines:
        engine.dispose()  # new connections get the listener below, after the engine's own
        event.listen(
            engine, "connect", lambda conn, _: conn.execute("PRAGMA busy_timeout=0"), insert=False
        )
    stores = [Store(engine) for engine in engines]
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(40):
                stores[i % 2].heartbeat(f"w{n}", "host", n, "model.a", float(i))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert {row["id"]: row["last_heartbeat"] for row in stores[0].worker_rows()} == {
        f"w{n}": 39.0 for n in range(8)
    }
