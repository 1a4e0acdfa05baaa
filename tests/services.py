"""Real PostgreSQL and Redis for the tests: the machine's own, or ones we start ourselves;
private servers that outage tests stop and start again; an upstream that never answers.

On a developer machine or CI box with the services running (127.0.0.1:5432 trust auth,
127.0.0.1:6379) they are used directly. Otherwise we start private servers from the installed
binaries (``initdb``/``postgres``, ``redis-server``) in a temp dir. If neither works the tests
fail, saying what to install; they never skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
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


def _pg_bindir() -> str:
    """The directory of the newest installed PostgreSQL server binaries (Debian's
    ``/usr/lib/postgresql/<version>/bin``, else ``initdb`` on the PATH)."""
    on_path = shutil.which("initdb")
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([on_path] if on_path else [])
    if not bins:
        raise RuntimeError(
            "PostgreSQL is not reachable at 127.0.0.1:5432 and no server binaries were found: "
            "install PostgreSQL (Debian: apt-get install postgresql) or set FUSILLADE_TEST_PG"
        )
    return os.path.dirname(bins[-1])


class PostgresServer:
    """A private PostgreSQL server of our own, from the installed binaries (``initdb``,
    ``pg_ctl``), in a temp directory on a free port of 127.0.0.1, with trust auth for user
    ``postgres``. Run as the ``postgres`` user when we are root (PostgreSQL refuses root).

    Unlike the machine's server it may be stopped and started again, on the same port and
    data directory, so a test can take the database away from running processes and give it
    back (``stop`` / ``start``). Use it as a context manager: started on enter; stopped and
    removed on exit."""

    def __init__(self, max_connections: int = 300):
        self.bindir = _pg_bindir()
        self.tmp = tempfile.mkdtemp(prefix="fusillade-pg-")
        self.data = f"{self.tmp}/data"
        self.log = f"{self.tmp}/postgres.log"
        self.port = free_port()
        self.max_connections = max_connections
        self._user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._user:
            shutil.chown(self.tmp, "postgres")
        self._pg(["initdb", "-D", self.data, "-U", "postgres", "--auth=trust"])

    @property
    def url(self) -> str:
        """The admin URL (database ``postgres``)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, cmd: list[str], timeout: float = 60) -> None:
        subprocess.run(
            [*self._user, f"{self.bindir}/{cmd[0]}", *cmd[1:]],
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self) -> None:
        """Start the server (again: same port and data, after crash recovery if it was stopped
        ``immediate``) and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.tmp} -c listen_addresses=127.0.0.1 "
            f"-c max_connections={self.max_connections} -c fsync=off"
        )
        self._pg(["pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "start"])
        wait_for(lambda: _pg_ok(self.url), 30, what="private PostgreSQL to start")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode``: ``fast`` (clients disconnected, clean shutdown),
        ``immediate`` (every process quits at once, as in a crash; the next start recovers)."""
        self._pg(["pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"])

    def running(self) -> bool:
        return _pg_ok(self.url)

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self.stop("fast")
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields an admin URL (database ``postgres``) of a reachable server."""
    if _pg_ok(PG_ADMIN_URL):
        yield PG_ADMIN_URL
        return
    with PostgresServer() as server:
        yield server.url


class RedisServer:
    """A private ``redis-server`` on a free port of 127.0.0.1 that keeps nothing on disk.
    ``kill`` and ``start`` again bring it back on the same port, empty (queued messages are
    lost, as in a real restart without persistence). Context manager: started on enter,
    killed on exit."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "Redis is not reachable at 127.0.0.1:6379 and redis-server is not installed: "
                "install it (Debian: apt-get install redis-server) or set FUSILLADE_TEST_REDIS"
            )
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The base URL (no db number)."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for(lambda: _redis_ok(self.url), 30, what="private Redis to start")

    def kill(self) -> None:
        """SIGKILL: clients see their connections reset, and nothing is saved."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(30)
            self.proc = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextmanager
def redis_server() -> Iterator[str]:
    """Yields a base URL (no db number) of a reachable Redis."""
    if _redis_ok(REDIS_URL):
        yield REDIS_URL
        return
    with RedisServer() as server:
        yield server.url


class SilentUpstream:
    """A TCP server that accepts every connection, reads what is sent, and never answers: an
    upstream that hangs. It records the ``X-Fusillade-Custom-Id`` of each request it read
    (``custom_ids``, one entry per attempt) and holds every socket open until closed. Runs in
    a daemon thread; context manager (closes every socket on exit)."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self.connections = 0
        self.custom_ids: list[str] = []
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-upstream", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        readers: list[threading.Thread] = []
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with self._lock:
                self.connections += 1
                self._held.append(conn)
            reader = threading.Thread(target=self._read, args=(conn,), daemon=True)
            reader.start()
            readers.append(reader)
        for reader in readers:
            reader.join(5)

    def _read(self, conn: socket.socket) -> None:
        """Read requests off ``conn`` (never answering) until the client closes it."""
        conn.settimeout(0.2)
        buf = b""
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\r\n\r\n" in buf:
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"x-fusillade-custom-id":
                        with self._lock:
                            self.custom_ids.append(value.strip().decode())
                    elif name.strip().lower() == b"content-length":
                        length = int(value)
                buf = buf[length:]  # a hang-up upstream: the body is read only to skip it

    def __enter__(self) -> SilentUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sock.close()
        with self._lock:
            for conn in self._held:
                conn.close()
            self._held.clear()


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
