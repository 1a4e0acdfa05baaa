"""A real distributed deployment, started as processes: PostgreSQL database, Redis, the mock
upstream, ``celery beat`` and two ``celery worker -Q model.<m> -P gevent -c 20``.

Started once per session (about 10 s) and shared; tests use their own models or custom_ids so
they do not read each other's traffic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from fusillade_celery.app import configure
from fusillade_celery.db import dispose_all, get_engine, normalize_url
from fusillade_celery.migrate import upgrade
from fusillade_celery.settings import Settings
from fusillade_celery.submit import Client

from .. import services

API_KEY = "sk-integration-SECRET-4242"
MODELS = ("limited", "wide", "wider", "m1", "m2", "live")
REDIS_DB = 11


@dataclass
class Cluster:
    env: dict[str, str]
    settings: Settings
    client: Client
    mock_url: str
    log_dir: Path
    broker_url: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def mock_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = requests.get(self.mock_url + "/_mock/stats", timeout=10).json()
        return stats

    def calls_for(self, prefix: str) -> dict[str, list[dict[str, Any]]]:
        """The mock's call log for custom_ids starting with ``prefix``, per custom_id, in order."""
        out: dict[str, list[dict[str, Any]]] = {}
        for entry in self.mock_stats()["log"]:
            if entry["custom_id"].startswith(prefix):
                out.setdefault(entry["custom_id"], []).append(entry)
        for calls in out.values():
            calls.sort(key=lambda e: e["call"])
        return out

    def wait_done(self, batch_id: str, timeout: float = 60) -> dict[str, Any]:
        terminal = {"completed", "failed", "expired", "cancelled"}
        return services.wait_for(
            lambda: (b := self.client.get_batch(batch_id))["status"] in terminal and b,
            timeout,
            interval=0.1,
            what=f"batch {batch_id} to finish",
        )

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.log_dir.glob("*.log"))


def migrated_template(admin_url: str) -> str:
    """A new database on the server of ``admin_url``, migrated to head, to pass to
    ``running_cluster`` as its ``pg_template`` (the session's ``pg_template`` fixture is on
    the shared server; a test with a private server makes its own). Returns its name."""
    name = services.create_database(admin_url)
    engine = get_engine(normalize_url(services.with_db(admin_url, name)))
    upgrade(engine)
    engine.dispose()
    dispose_all()
    return name


def _celery(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "fusillade_celery", *cmd],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class Processes:
    """Start, kill and restart the cluster's celery processes by name."""

    def __init__(self, cluster: Cluster, queues: str, pool: str = "gevent"):
        self.c = cluster
        self.queues = queues
        self.pool = pool

    def start_worker(
        self, name: str, concurrency: int = 20, env: dict[str, str] | None = None
    ) -> None:
        """Start worker ``name``; ``env`` adds to the cluster's environment (its own port)."""
        log = self.c.log_dir / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        self.c.procs[name] = _celery(
            [
                "worker",
                "-Q",
                self.queues,
                "-P",
                self.pool,
                "-c",
                str(concurrency),
                "-n",
                f"{name}@%h",
                "-l",
                "info",
            ],
            {**self.c.env, **(env or {})},
            log,
        )
        services.wait_for(
            lambda: "ready." in log.read_text(errors="replace")[offset:],
            60,
            what=f"worker {name} to be ready (log: {log})",
        )

    def start_beat(self) -> None:
        self.c.procs["beat"] = _celery(
            ["beat", "-l", "info", "--schedule", str(self.c.log_dir / "beat-schedule")],
            self.c.env,
            self.c.log_dir / "beat.log",
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.c.procs.pop(name)
        os.killpg(proc.pid, sig)
        proc.wait(60)

    def stop_all(self) -> None:
        for proc in self.c.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.c.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.c.procs.clear()


@contextmanager
def running_cluster(
    pg_admin: str,
    pg_template: str,
    redis_base: str,
    log_dir: Path,
    redis_db: int,
    models: tuple[str, ...],
    env_extra: dict[str, str],
    workers: int = 2,
    pool: str = "gevent",
) -> Iterator[tuple[Cluster, Processes]]:
    db_name = services.create_database(pg_admin, template=pg_template)
    db_url = normalize_url(services.with_db(pg_admin, db_name))
    broker_url = f"{redis_base}/{redis_db}"
    redis.Redis.from_url(broker_url).flushdb()
    mock = subprocess.Popen(
        [sys.executable, "-m", "fusillade_celery.cli", "mock-upstream", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert mock.stdout is not None
    mock_url = mock.stdout.readline().strip().rsplit(" ", 1)[1]
    env = {
        **os.environ,
        "FUSILLADE_DATABASE_URL": db_url,
        "FUSILLADE_BROKER_URL": broker_url,
        "FUSILLADE_UPSTREAM_URL": mock_url,
        "FUSILLADE_UPSTREAM_API_KEY": API_KEY,
        "FUSILLADE_BACKOFF_MS": "200",
        "FUSILLADE_MAX_BACKOFF_MS": "2000",
        "FUSILLADE_TIMEOUT_MS": "1500",
        "FUSILLADE_CLAIM_INTERVAL_MS": "500",
        "FUSILLADE_CLAIM_BATCH_SIZE": "100",
        "PYTHONUNBUFFERED": "1",
        **env_extra,
    }
    settings = Settings.from_env(env)
    configure(settings)
    c = Cluster(env, settings, Client(settings), mock_url, log_dir, broker_url)
    procs = Processes(c, ",".join(f"model.{m}" for m in models), pool)
    try:
        procs.start_beat()
        for i in range(workers):
            procs.start_worker(f"w{i + 1}")
        yield c, procs
    finally:
        procs.stop_all()
        mock.terminate()
        mock.wait(10)
        mock.stdout.close()
        configure(Settings())
        services.drop_database(pg_admin, db_name)


@pytest.fixture(scope="session")
def cluster(
    pg_admin: str, pg_template: str, redis_base: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with running_cluster(
        pg_admin,
        pg_template,
        redis_base,
        tmp_path_factory.mktemp("cluster"),
        REDIS_DB,
        MODELS,
        {
            "FUSILLADE_MODEL_LIMITS": "limited=5,wide=30,wider=50",
            "FUSILLADE_DEFAULT_MODEL_LIMIT": "10",
        },
    ) as (c, _):
        yield c
