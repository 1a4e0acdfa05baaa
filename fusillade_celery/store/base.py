"""What every part of the store shares: the row types the rest of the engine uses
(``WorkItem``, ``Finish``, ...), fenced-write helpers, the disconnect retry, and
``StoreBase``, which owns the engine and hands out transactions."""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    Float,
    Integer,
    Text,
    and_,
    any_,
    bindparam,
    case,
    column,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from .. import schema as t
from ..db import writer_lock
from ..states import IN_FLIGHT, NOT_TERMINAL, RequestState

S = RequestState
F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)
DISCONNECT_RETRIES = 4
#: How early a retrying row may start before its ``not_before`` (``Store.start``): the clock
#: skew allowed between the worker that wrote the retry and the one that runs it.
RETRY_EARLY_TOLERANCE_S = 1.0
#: The error a request gets when the reaper takes it back from a worker that died or went
#: silent while it was processing (fusillade's ``FailureReason::TaskTerminated``).
TASK_TERMINATED_DETAIL = "the worker processing it died or stopped answering (reaped)"
_IN_FLIGHT = sorted(s.value for s in IN_FLIGHT)
_NOT_TERMINAL = sorted(s.value for s in NOT_TERMINAL)


def _fence_state(*states: RequestState) -> ColumnElement[bool]:
    """``state IN states`` written as ``state NOT IN (every other state)``, for the fenced
    writes that look rows up by primary key. Why: the in-flight partial index's predicate is
    implied by ``state IN (claimed, ...)``, and right after a big submit the statistics say no
    row is in flight, so PostgreSQL picked that index and scanned every in-flight row (3 ms
    per 16-row start at 10,000 in flight) instead of 16 primary-key probes. The complement
    means the same thing but cannot match the partial index, so the primary key drives.
    Written as ``<>`` terms rather than NOT IN: an IN list is re-rendered on every call."""
    col = t.requests.c.state
    return and_(*(col != s.value for s in RequestState if s not in states))


#: One write-back row, as both write paths read it (see ``_result_row``).
_RESULT_COLUMNS = (
    column("id", BigInteger),
    column("token", Text),
    column("state", Text),
    column("status", Integer),
    column("body", Text),
    column("error", Text),
    column("not_before", Float),
)
#: The states a write-back may move a ``processing`` row to.
_WRITE_BACK_STATES = frozenset({S.COMPLETED, S.FAILED, S.RETRYING})


def _result_row(f: Finish) -> dict[str, Any]:
    """What a write-back stores for one attempt, keyed like ``_RESULT_COLUMNS``."""
    if f.state not in _WRITE_BACK_STATES:
        raise ValueError(f"finish cannot move a request to {f.state}")
    return {
        "id": f.id,
        "token": f.token,
        "state": f.state.value,
        "status": f.status,
        "body": f.body,
        "error": json.dumps(f.error) if f.error else None,
        "not_before": f.not_before if f.state is S.RETRYING else None,
    }


def _write_back_values(now: float, result: Callable[[str], Any]) -> dict[str, Any]:
    """The SET clause of a write-back, each attempt's values read through ``result(name)`` (a
    bind per row, or a column of the JSON rows). One statement serves every target state: the
    state's own timestamp is set by a CASE, a retry counts an attempt and keeps its due time.
    Why not a statement per state: a chunk mixes them, and each statement is a round trip."""
    r = t.requests
    state = result("state")
    retrying = state == S.RETRYING.value
    return {
        "state": state,
        "completed_at": case((state == S.COMPLETED.value, now), else_=r.c.completed_at),
        "failed_at": case((state == S.FAILED.value, now), else_=r.c.failed_at),
        "attempt": r.c.attempt + case((retrying, 1), else_=0),
        "not_before": case((retrying, result("not_before")), else_=r.c.not_before),
        "response_status": result("status"),
        "response_body": result("body"),
        "error": result("error"),
    }


_ACTIVE_BATCH = and_(
    t.batches.c.completed_at.is_(None),
    t.batches.c.failed_at.is_(None),
    t.batches.c.expired_at.is_(None),
    t.batches.c.cancelled_at.is_(None),
    t.batches.c.deleted_at.is_(None),
)
#: Batch columns that may be sent upstream as ``x-fusillade-batch-<column>`` headers.
HEADER_COLUMNS = ("id", "endpoint", "completion_window", "created_at", "expires_at", "owner")


#: SQLSTATEs that mean the server is going away or not yet accepting connections.
_UNAVAILABLE = frozenset({"57P01", "57P02", "57P03"})


def unreachable(exc: DBAPIError) -> bool:
    """The database could not be reached or dropped the connection, rather than refusing
    the statement (a deadlock, a serialization failure, a full disk, which carry an SQLSTATE
    of their own): worth waiting for. Connection failures carry no SQLSTATE, or class 08."""
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    state = getattr(exc.orig, "sqlstate", None)
    if state:
        return str(state).startswith("08") or state in _UNAVAILABLE
    return True  # no SQLSTATE: psycopg's connection failures, SQLite's locked or I/O errors


_R = TypeVar("_R")


def retry_while_unreachable(run: Callable[[], _R], patience_s: float, what: str) -> _R:
    """``run()``, tried again while the database is unreachable (a restart, a failover, a
    network cut) for up to ``patience_s``: 0.25 s between tries, doubling to 5 s. Other
    errors, and the last one, are raised. For work whose loss costs more than the wait: a
    write-back of answers the upstream already gave, the check before a call."""
    until = time.monotonic() + patience_s
    delay = 0.25
    while True:
        try:
            return run()
        except DBAPIError as exc:
            if not unreachable(exc) or time.monotonic() + delay > until:
                raise
            first = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            log.warning("database unreachable (%s); %s retried in %.1f s", first, what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _on_disconnect_retry(fn: F) -> F:
    """Run the transaction again on a fresh connection when the server dropped ours
    (``pg_terminate_backend``, a PostgreSQL restart, a network blip). Safe because every
    statement here is conditional on the state it expects: re-running a committed write is a
    no-op, re-running a claim claims other rows (the first ones are reaped if orphaned)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(DISCONNECT_RETRIES):
            try:
                return fn(*args, **kwargs)
            except DBAPIError as exc:
                if not exc.connection_invalidated or attempt == DISCONNECT_RETRIES - 1:
                    raise
                log.warning("database connection lost (%s); retrying the transaction", exc.orig)
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]


class NotFound(LookupError):
    """The batch or file does not exist (or was deleted)."""


@dataclass(frozen=True)
class Claimed:
    id: int
    batch_id: str


@dataclass(frozen=True)
class WorkItem:
    """Everything one upstream attempt needs, loaded when the request starts processing.
    ``token`` is the claim token the row holds: its write-back is fenced on it."""

    id: int
    token: str
    custom_id: str
    batch_id: str
    model: str
    routed_model: str
    attempt: int
    deadline: float
    url: str
    body: str
    upstream_url: str | None
    api_key: str | None
    batch_fields: dict[str, Any]

    def __repr__(self) -> str:  # the key and the body never reach a log through repr
        return f"WorkItem(id={self.id}, custom_id={self.custom_id!r}, attempt={self.attempt})"


@dataclass(frozen=True)
class Finish:
    """The write-back of one attempt: a terminal state, or ``retrying`` with its due time.
    Fenced on (id, token, state=processing)."""

    id: int
    token: str
    state: RequestState
    status: int | None = None
    body: str | None = None
    error: dict[str, Any] | None = None
    not_before: float | None = None


@dataclass(frozen=True)
class HandOff:
    """Where the slots a write-back frees go (``Store.finish``): to the next pending requests
    of ``model`` (the routed model of the rows written, whose slots they are), started at
    once by ``worker_id``."""

    model: str
    worker_id: str
    #: The batches' sending cutoff is their deadline minus this (stop_before_deadline).
    stop_before_s: float = 0.0
    #: The claim token the requests get (a fresh one when None); chosen by the caller so
    #: that it can find them if the statement's reply is lost (``execute._write``).
    token: str | None = None


@dataclass(frozen=True)
class Written:
    """What ``Store.finish`` did: rows written (fewer than given when some were stale), and
    the requests it started in the freed slots (a hand-off)."""

    changed: int
    started: list[WorkItem]


def new_token() -> str:
    return uuid.uuid4().hex


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a model name."""
    return zlib.crc32(b"fusillade-claim:" + name.encode()) - 2**31


def _start_columns() -> list[Any]:
    """What an attempt needs (``WorkItem``), read when its request starts processing."""
    r, rt, b = t.requests, t.request_templates, t.batches
    return [
        r.c.id,
        r.c.custom_id,
        r.c.batch_id,
        r.c.model,
        r.c.routed_model,
        r.c.attempt,
        r.c.deadline,
        rt.c.url,
        rt.c.body,
        b.c.upstream_url,
        b.c.upstream_api_key,
        *[b.c[c].label("b_" + c) for c in HEADER_COLUMNS],
    ]


def _work_item(m: Any, token: str) -> WorkItem:
    return WorkItem(
        id=m["id"],
        token=token,
        custom_id=m["custom_id"],
        batch_id=m["batch_id"],
        model=m["model"],
        routed_model=m["routed_model"] or m["model"],
        attempt=m["attempt"],
        deadline=m["deadline"],
        url=m["url"],
        body=m["body"],
        upstream_url=m["upstream_url"],
        api_key=m["upstream_api_key"],
        batch_fields={c: m["b_" + c] for c in HEADER_COLUMNS},
    )


def _p(name: str, type_: Any = None) -> Any:
    """A bind parameter of the hot statements (``p_`` prefix: an UPDATE reserves the names of
    the columns it sets)."""
    return bindparam("p_" + name, type_=type_)


def _ids_bind(postgres: bool) -> ColumnElement[bool]:
    """``requests.id IN :p_ids`` for the hot path. On PostgreSQL one array parameter
    (``= ANY(:p_ids)``): an IN list is rendered bind by bind on every call, which cost more
    client CPU than a 16-row statement itself; SQLite has no arrays (an expanding IN)."""
    r = t.requests
    if postgres:
        return r.c.id == any_(_p("ids", ARRAY(BigInteger)))
    return r.c.id.in_(bindparam("p_ids", expanding=True))


class StoreBase:
    """The connection handling every part of the store shares (``Store`` is made of them)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        #: The same pool, each statement its own transaction (PostgreSQL; see ``_one``).
        self._autocommit = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if self.is_postgres else engine
        )
        #: Held by every transaction (SQLite: the process's writers take turns; db.writer_lock).
        self._writer = writer_lock(engine)

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._writer, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _one(self) -> Iterator[Connection]:
        """A connection for one statement that is atomic by itself (PostgreSQL), sent without
        ``BEGIN`` and ``COMMIT``: on the hot path each of those was a round trip of its own,
        and under gevent every round trip also waits its turn behind the worker's other
        greenlets. SQLite (several statements where PostgreSQL needs one) gets a transaction."""
        if not self.is_postgres:
            with self._tx() as conn:
                yield conn
            return
        with self._autocommit.connect() as conn:
            yield conn
