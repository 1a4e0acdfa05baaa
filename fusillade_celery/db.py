"""Engines: one per process and URL, created lazily so forked workers never share sockets.

SQLite (the embedded default) is tuned for one writer at a time: WAL, a busy timeout, and
``BEGIN IMMEDIATE`` so a transaction takes the write lock up front instead of failing on the
upgrade from read to write under concurrency. Within one process the writers also queue on a
lock of their own (``writer_lock``) before they ask SQLite.
"""

from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

_engines: dict[tuple[str, int, bool], Engine] = {}
_writers: dict[tuple[str, int], threading.RLock] = {}
_lock = threading.Lock()


class SchemaError(RuntimeError):
    """The database exists but is not migrated to the version this code needs."""


def normalize_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 here (the only driver installed)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(url: str) -> bool:
    return make_url(normalize_url(url)).get_backend_name() == "sqlite"


def get_engine(url: str, pool_size: int = 10, pre_ping: bool = True) -> Engine:
    """The process's engine for ``url`` (a new one after fork: the key holds the pid).

    ``pre_ping`` tests each connection on checkout (one round trip). Clients keep it: their
    calls are not retried. Workers turn it off: every store method they call retries the whole
    transaction on a dropped connection, and on the hot path that ping was a round trip per
    transaction."""
    key = (url, os.getpid(), pre_ping)
    engine = _engines.get(key)
    if engine is None:
        with _lock:
            engine = _engines.get(key)
            if engine is None:
                engine = _create(url, pool_size, pre_ping)
                _engines[key] = engine
    return engine


def writer_lock(engine: Engine) -> AbstractContextManager[Any]:
    """What a transaction on ``engine`` holds while it runs: for a SQLite file, one lock per
    file and process, shared by every engine of this process on that file (the embedded mode
    has a client's and the worker's), so its threads take turns here rather than in SQLite.
    Why: a ``BEGIN IMMEDIATE`` that finds the file locked sleeps in SQLite's busy handler,
    1 ms and then longer each retry, however soon the lock is free; with 32 worker threads
    writing back, those sleeps averaged 60 ms a transaction (benchmark "embedded"), time in
    which the requests handed on by that write-back waited. A lock wakes the next writer as
    soon as it is free. Re-entrant, so a thread that opened a second transaction inside one
    meets SQLite's busy timeout and an error, as before, not a silent hang. PostgreSQL needs
    nothing: its writers lock rows, not the database."""
    if engine.dialect.name != "sqlite":
        return nullcontext()
    key = (str(engine.url), os.getpid())
    with _lock:
        return _writers.setdefault(key, threading.RLock())


def dispose_all() -> None:
    """Drop every engine of this process (tests, worker shutdown)."""
    with _lock:
        for (_, pid, _), engine in list(_engines.items()):
            if pid == os.getpid():
                engine.dispose()
        _engines.clear()


def _create(url: str, pool_size: int, pre_ping: bool) -> Engine:
    url = normalize_url(url)
    if is_sqlite(url):
        engine = create_engine(
            url,
            connect_args={"timeout": 60, "check_same_thread": False},
            hide_parameters=True,  # errors quote no parameter (an API key, say)
        )
        _tune_sqlite(engine)
        return engine
    kwargs: dict[str, Any] = {
        # Errors quote no parameter: a statement's could hold a batch's API key.
        "hide_parameters": True,
        "pool_size": pool_size,
        "max_overflow": pool_size * 2,
        "pool_pre_ping": pre_ping,
        "pool_recycle": 1800,
    }
    return create_engine(url, **kwargs)


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
