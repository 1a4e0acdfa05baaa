"""Real PostgreSQL and Redis for the tests: the machine's own, or ones we start ourselves.

On a developer machine or CI box with the services running (127.0.0.1:5432 trust auth,
127.0.0.1:6379) they are used directly. Otherwise we start private servers from the installed
binaries (``initdb``/``postgres``, ``redis-server``) in a temp dir. If neither works the tests
fail, saying what to install; they never skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import redis

PG_ADMIN_URL = os.environ.get("FUSILLADE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("FUSILLADE_TEST_REDIS", "redis://127.0.0.1:6379")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def _pg_ok(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _redis_ok(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields an admin URL (database ``postgres``) of a reachable server."""
    if _pg_ok(PG_ADMIN_URL):
        yield PG_ADMIN_URL
        return
    on_path = shutil.which("initdb")
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([on_path] if on_path else [])
    if not bins:
        raise RuntimeError(
            "PostgreSQL is not reachable at 127.0.0.1:5432 and no server binaries were found: "
            "install PostgreSQL (Debian: apt-get install postgresql) or set FUSILLADE_TEST_PG"
        )
    bindir = os.path.dirname(bins[-1])
    tmp = tempfile.mkdtemp(prefix="fusillade-pg-")
    port = free_port()
    user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if user:
        shutil.chown(tmp, "postgres")
    subprocess.run(
        [*user, f"{bindir}/initdb", "-D", f"{tmp}/data", "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen(
        [
            *user,
            f"{bindir}/postgres",
            "-D",
            f"{tmp}/data",
            "-p",
            str(port),
            "-k",
            tmp,
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=300",
            "-c",
            "fsync=off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        wait_for(lambda: _pg_ok(url), 30, what="private PostgreSQL to start")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def redis_server() -> Iterator[str]:
    """Yields a base URL (no db number) of a reachable Redis."""
    if _redis_ok(REDIS_URL):
        yield REDIS_URL
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "Redis is not reachable at 127.0.0.1:6379 and redis-server is not installed: "
            "install it (Debian: apt-get install redis-server) or set FUSILLADE_TEST_REDIS"
        )
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    try:
        wait_for(lambda: _redis_ok(url), 30, what="private Redis to start")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def with_db(admin_url: str, name: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


def create_database(admin_url: str, template: str | None = None) -> str:
    name = "fus_test_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        tmpl = f" TEMPLATE {template}" if template else ""
        conn.execute(f"CREATE DATABASE {name}{tmpl}")
    return name


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
