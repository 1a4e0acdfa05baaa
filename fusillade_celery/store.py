"""All SQL of the engine, one method per statement group, named for what it does.

Tasks, the CLI and the submit helper call these methods and never hold a cursor. Every write
that belongs to an execution is fenced: ``WHERE id = :id AND claim_token = :token AND state =
:expected``, so a stale, duplicate or late message changes nothing (docs/architecture.md
invariant 2).
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
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
    cast,
    column,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError

from . import schema as t
from .db import writer_lock
from .states import IN_FLIGHT, NOT_TERMINAL, TERMINAL, ErrorKind, RequestState

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


class _ClaimQuery:
    """The parts of a claim as templates of bind parameters (``_claim_params`` fills them),
    shared by the claim (``Store.claim``), its EXPLAIN (``Store.claim_plan``) and a hand-off
    (``Store.finish``), which claims straight into ``processing`` for the worker that runs the
    rows (``started_by``). Each statement is built once per shape (the ``functools.cache``
    functions below): building a statement of CTEs took a worker about 5 ms of CPU, more than
    the server took to run it."""

    def __init__(self, deadline_before: bool = False, started_by: bool = False):
        r = t.requests
        self.now = _p("now", Float)
        self.in_flight = (
            select(func.count())
            .select_from(r)
            .where(r.c.routed_model == _p("routed", Text), r.c.state.in_(_IN_FLIGHT))
        )
        pick = select(r.c.id).where(
            r.c.model == _p("model", Text),
            r.c.state == S.PENDING.value,
            # Rows of a batch past its sending cutoff (expires_at - stop_before_deadline)
            # are never claimed: their calls would start after the deadline.
            r.c.deadline > _p("cutoff", Float),
            or_(r.c.not_before.is_(None), r.c.not_before <= self.now),
        )
        if deadline_before:
            pick = pick.where(r.c.deadline < _p("deadline_before", Float))
        self.pick = pick.order_by(r.c.deadline, r.c.id).with_for_update(skip_locked=True)
        self.mark: dict[str, Any] = {
            "state": S.CLAIMED.value,
            "claim_token": _p("token", Text),
            "claimed_at": self.now,
            "routed_model": _p("routed", Text),
            "worker_id": None,
        }
        if started_by:
            self.mark.update(
                state=S.PROCESSING.value, started_at=self.now, worker_id=_p("worker", Text)
            )

    def picked(self, room: Any) -> ColumnElement[bool]:
        """``id = ANY(<up to room picked ids, as one array>)``, not ``id IN (<pick>)``: not
        knowing the room in advance, the planner plans the IN for 10 % of the table, and at a
        million pending rows it scanned all of them (200 ms a claim rather than 16)."""
        ids: Any = select(func.array_agg(column("id"))).select_from(
            self.pick.limit(room).subquery()
        )
        return t.requests.c.id == any_(cast(ids.scalar_subquery(), ARRAY(BigInteger)))

    def claim_rows(self, chosen: ColumnElement[bool]) -> Any:
        r = t.requests
        return update(r).where(chosen).values(**self.mark).returning(r.c.id, r.c.batch_id)

    def start_rows(self, chosen: ColumnElement[bool]) -> Any:
        """Claim straight into ``processing``, returning what the attempts need (PostgreSQL:
        RETURNING can read the joined tables)."""
        r, rt, b = t.requests, t.request_templates, t.batches
        return (
            update(r)
            .where(chosen, rt.c.id == r.c.template_id, b.c.id == r.c.batch_id)
            .values(**self.mark)
            .returning(*_start_columns())
        )

    def mark_started(self, batch_ids: Any) -> Any:
        """Batches not yet started read ``in_progress`` from now. A batch row locked by someone
        else is skipped, not waited for: the holder is cancelling or expiring the batch (it
        ends anyway), or another claim marking it. Waiting deadlocked a hand-off against a
        cancel: the hand-off holds the batch's pending rows and wants its row, the cancel
        holds the row and wants the requests."""
        b = t.batches
        unstarted = (
            select(b.c.id)
            .where(b.c.id.in_(batch_ids), b.c.in_progress_at.is_(None))
            .with_for_update(skip_locked=True)
        )
        return update(b).where(b.c.id.in_(unstarted)).values(in_progress_at=self.now)


def _claim_params(
    model: str,
    routed: str,
    token: str,
    now: float,
    deadline_before: float | None = None,
    worker: str | None = None,
    stop_before_s: float = 0.0,
) -> dict[str, Any]:
    params = {
        "p_model": model,
        "p_routed": routed,
        "p_token": token,
        "p_now": now,
        "p_cutoff": now + stop_before_s,
    }
    for name, value in (("deadline_before", deadline_before), ("worker", worker)):
        if value is not None:
            params["p_" + name] = value
    return params


@functools.cache
def _claim_statement(deadline_before: bool) -> Any:
    """Count, pick, claim and mark started in one statement (PostgreSQL)."""
    q = _ClaimQuery(deadline_before=deadline_before)
    room = func.greatest(
        func.least(_p("batch_size", Integer), _p("limit", Integer) - q.in_flight.scalar_subquery()),
        0,
    )
    claimed = q.claim_rows(q.picked(room)).cte("claimed")
    started = q.mark_started(select(claimed.c.batch_id)).cte("started")
    return select(claimed.c.id, claimed.c.batch_id).add_cte(started)


def _sqlite_claim_rows(q: _ClaimQuery) -> Any:
    """SQLite: claim ``p_room`` of the rows ``q`` picks, returning (id, batch_id)."""
    chosen = t.requests.c.id.in_(q.pick.limit(_p("room", Integer)).scalar_subquery())
    return q.claim_rows(chosen)


@functools.cache
def _sqlite_claim_statements(deadline_before: bool) -> tuple[Any, Any]:
    """SQLite's claim: the in-flight count, then the claim of ``p_room`` rows."""
    q = _ClaimQuery(deadline_before=deadline_before)
    return q.in_flight, _sqlite_claim_rows(q)


@functools.cache
def _start_statement(postgres: bool) -> Any:
    """claimed|retrying -> processing, fenced on the token (PostgreSQL: joined to what the
    attempts need; SQLite's RETURNING cannot name joined tables: the ids, read after)."""
    r, rt, b = t.requests, t.request_templates, t.batches
    move = (
        update(r)
        .where(_ids_bind(postgres), r.c.claim_token == _p("token", Text))
        .where(_fence_state(S.CLAIMED, S.RETRYING))
        # A retrying row starts once its backoff is over (give or take the writers' clock
        # skew): a redelivered original message (its worker was lost after the write-back)
        # carries the same token and would otherwise send the retry early.
        .where(
            or_(
                r.c.state == S.CLAIMED.value,
                r.c.not_before <= _p("now", Float) + RETRY_EARLY_TOLERANCE_S,
            )
        )
        .values(state=S.PROCESSING.value, started_at=_p("now", Float), worker_id=_p("worker", Text))
    )
    if postgres:
        return move.where(rt.c.id == r.c.template_id, b.c.id == r.c.batch_id).returning(
            *_start_columns()
        )
    return move.returning(r.c.id)


def _items(where: ColumnElement[bool]) -> Any:
    """Rows matching ``where`` with what their attempts need (``_work_item``), in id order."""
    r, rt, b = t.requests, t.request_templates, t.batches
    return (
        select(*_start_columns())
        .join(rt, rt.c.id == r.c.template_id)
        .join(b, b.c.id == r.c.batch_id)
        .where(where)
        .order_by(r.c.id)
    )


@functools.cache
def _read_items_statement() -> Any:
    return _items(_ids_bind(False))


@functools.cache
def _held_statement() -> Any:
    """The processing rows holding ``p_token``, with what their attempts need."""
    r = t.requests
    return _items(and_(r.c.claim_token == _p("token", Text), r.c.state == S.PROCESSING.value))


@functools.cache
def _write_back_statement(hand_off: bool) -> Any:
    """PostgreSQL: one ``UPDATE ... FROM json_to_recordset(:p_rows)`` (plus the hand-off, as
    CTEs of the same statement). Why one statement: executemany sends a statement per row,
    and at thousands of rows a second that per-row overhead (client and server) cost more
    than the writes. Why one JSON parameter rather than an array per column: psycopg quotes
    every element of a text array in Python, which cost 4-5 % of a worker's CPU on the
    response bodies; ``json.dumps`` escapes them in C."""
    r = t.requests
    v = (
        func.json_to_recordset(cast(_p("rows", Text), JSON))
        .table_valued(*_RESULT_COLUMNS)
        .render_derived(name="v", with_types=True)
    )
    # The ids also as an array: with only the join to the JSON rows (estimated at 100 rows),
    # PostgreSQL hashed them and scanned the whole table (1.1 ms a write-back at 10,000 rows).
    write = (
        update(r)
        .where(_ids_bind(True), r.c.id == v.c.id, r.c.claim_token == v.c.token)
        .where(_fence_state(S.PROCESSING))
        .values(**_write_back_values(_p("now", Float), lambda k: v.c[k]))
    )
    if not hand_off:
        return write
    done = write.returning(r.c.state).cte("done")
    freed = (
        select(func.count())
        .select_from(done)
        .where(done.c.state != S.RETRYING.value)
        .scalar_subquery()
    )
    q = _ClaimQuery(started_by=True)
    started = q.start_rows(q.picked(freed)).cte("handed")
    marked = q.mark_started(select(started.c.batch_id)).cte("marked")
    changed = select(func.count()).select_from(done).scalar_subquery().label("changed")
    one_row = select(literal(1).label("one")).subquery("one_row")
    return (
        select(changed, *started.c).select_from(one_row.outerjoin(started, true())).add_cte(marked)
    )


@functools.cache
def _sqlite_write_back_statement() -> Any:
    """SQLite: the write-back of one row, run as an executemany (no arrays, no JSON table
    functions). Fenced on (id, token, state=processing)."""
    r = t.requests
    fence = and_(
        r.c.id == bindparam("b_id"),
        r.c.claim_token == bindparam("b_token"),
        r.c.state == S.PROCESSING.value,
    )
    # Bind names get a prefix: "id" and "error" are the table's own column names.
    values = _write_back_values(_p("now", Float), lambda k: bindparam("b_" + k))
    return update(r).where(fence).values(**values)


@functools.cache
def _sqlite_hand_off_statement() -> Any:
    """SQLite's hand-off: claim ``p_room`` rows straight into processing."""
    return _sqlite_claim_rows(_ClaimQuery(started_by=True))


@functools.cache
def _sqlite_mark_started_statement() -> Any:
    """SQLite: the batches of the rows ``p_ids`` (just claimed) read ``in_progress``."""
    r = t.requests
    return _ClaimQuery().mark_started(select(r.c.batch_id).where(_ids_bind(False)))


class _Raised:
    """An exception of the read-ahead thread, carried to the consumer."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_T = TypeVar("_T")


def _read_ahead(items: Iterable[_T], depth: int = 2) -> Iterator[_T]:
    """``items``, produced by a background thread at most ``depth`` ahead of the consumer, so
    producing the next (parsing and validating input) overlaps with consuming this one
    (waiting for the database). An exception in the thread is raised here; leaving the loop
    early stops the thread."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(end)
        except BaseException as exc:  # noqa: BLE001 - carried to the consumer and raised there
            offer(_Raised(exc))

    thread = threading.Thread(target=produce, name="fusillade-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is end:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


class Store:
    """The state of record, behind one interface. Works on PostgreSQL and on SQLite."""

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

    # ------------------------------------------------------------------ submit

    def submit(
        self,
        file_row: dict[str, Any],
        batch_row: dict[str, Any],
        template_chunks: Iterable[list[dict[str, Any]]],
        make_batch: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
    ) -> str:
        """Insert the file, the batch, its templates and one request per line, in one
        transaction. ``template_chunks`` validates as it is consumed: an error raised there
        rolls everything back, so a refused file leaves no rows (invariant 7).
        ``make_batch()`` returns (batch columns, file columns) to update once the whole file
        has been read (count, models, size and hash are known only then).

        Each chunk's requests are inserted right after its templates, and on PostgreSQL the
        next chunk is parsed in a background thread meanwhile (``_read_ahead``): parsing a
        million lines took 14 s and storing them 35 s, one after the other (50 s a submit)."""
        rt = t.request_templates
        requests_of_lines = insert(t.requests).from_select(
            ["batch_id", "template_id", "custom_id", "model", "state", "deadline"],
            select(
                literal(batch_row["id"]),
                rt.c.id,
                rt.c.custom_id,
                rt.c.model,
                literal(S.PENDING.value),
                literal(batch_row["expires_at"]),
            )
            .where(
                rt.c.file_id == file_row["id"],
                rt.c.line_number.between(bindparam("first"), bindparam("last")),
            )
            .order_by(rt.c.line_number),
        )
        chunks = _read_ahead(template_chunks) if self.is_postgres else iter(template_chunks)
        with self._tx() as conn:
            conn.execute(insert(t.files), [file_row])
            conn.execute(insert(t.batches), [batch_row])
            for chunk in chunks:
                if not chunk:
                    continue
                if self.is_postgres:
                    self._copy_rows(conn, rt, chunk)
                else:
                    conn.execute(insert(rt), chunk)
                lines = {"first": chunk[0]["line_number"], "last": chunk[-1]["line_number"]}
                conn.execute(requests_of_lines, lines)
            batch_update, file_update = make_batch()
            conn.execute(
                update(t.files).where(t.files.c.id == file_row["id"]).values(**file_update)
            )
            conn.execute(
                update(t.batches).where(t.batches.c.id == batch_row["id"]).values(**batch_update)
            )
            return str(batch_row["id"])

    @staticmethod
    def _copy_rows(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
        """Bulk insert with PostgreSQL's COPY, inside the caller's transaction. Why: an
        executemany INSERT is a statement per row, and at a million lines that was most of a
        submit's time; COPY streams the rows in one command."""
        columns = list(rows[0])
        names = ", ".join(f'"{c}"' for c in columns)
        with (
            conn.connection.driver_connection.cursor() as cursor,  # type: ignore[union-attr]
            cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy,
        ):
            for row in rows:
                copy.write_row([row[c] for c in columns])

    # ------------------------------------------------------------------ claim

    @_on_disconnect_retry
    def active_models(self) -> set[str]:
        """Models of batches that are still running (not cancelling): the claimer's work list."""
        with self._tx() as conn:
            rows = conn.execute(
                select(t.batches.c.models).where(_ACTIVE_BATCH, t.batches.c.cancelling_at.is_(None))
            ).scalars()
            return {m for raw in rows for m in json.loads(raw)}

    @_on_disconnect_retry
    def claim(
        self,
        model: str,
        routed_model: str,
        limit: int,
        batch_size: int,
        now: float,
        deadline_before: float | None = None,
        stop_before_s: float = 0.0,
    ) -> tuple[str, list[Claimed]]:
        """Claim up to ``min(batch_size, limit - in-flight rows of routed_model)`` pending rows
        of ``model``, earliest deadline then line order, of batches whose deadline minus
        ``stop_before_s`` is still ahead. Returns the fresh claim token stamped on them (one
        per claim statement) and the rows. Serialized per routed model by an
        advisory lock on PostgreSQL, so two claimers cannot overshoot the limit.

        On PostgreSQL that is three round trips (there were six): ``BEGIN`` with the lock, one
        statement that counts, picks, claims and marks the batches started, and ``COMMIT``.
        The lock is taken by a statement of its own because a statement sees only the rows
        committed before it began: a count in the lock's statement could miss the claim it
        waited for. Claimers wait for the lock rather than skip (one that gave up would leave
        the slots freed meanwhile idle until the next trigger), so what it is held for, two
        round trips now rather than four, is what other workers' refills queue behind."""
        token = new_token()
        params = _claim_params(
            model, routed_model, token, now, deadline_before, stop_before_s=stop_before_s
        )
        escalating = deadline_before is not None
        if self.is_postgres:
            with self._autocommit.begin() as conn:
                # One simple-protocol round trip; the key is an integer computed here. READ
                # COMMITTED named, not left to the server's default: the count must see what
                # committed before the lock was granted, not before the transaction began.
                conn.exec_driver_sql(
                    "BEGIN ISOLATION LEVEL READ COMMITTED; "
                    f"SELECT pg_advisory_xact_lock({_lock_key(routed_model)})",
                    execution_options={"no_parameters": True},
                )
                rows = conn.execute(
                    _claim_statement(escalating),
                    {**params, "p_limit": limit, "p_batch_size": batch_size},
                )
                claims = [Claimed(i, batch) for i, batch in rows]
        else:
            in_flight, claim_rows = _sqlite_claim_statements(escalating)
            with self._tx() as conn:  # BEGIN IMMEDIATE: SQLite serializes the writers
                n = min(batch_size, limit - conn.execute(in_flight, params).scalar_one())
                if n <= 0:
                    return token, []
                claims = [
                    Claimed(i, batch)
                    for i, batch in conn.execute(claim_rows, {**params, "p_room": n})
                ]
                if claims:
                    marked = {"p_ids": [c.id for c in claims], "p_now": now}
                    conn.execute(_sqlite_mark_started_statement(), marked)
        return token, sorted(claims, key=lambda c: c.id)

    def claim_plan(self, model: str, routed_model: str, limit: int, batch_size: int) -> list[str]:
        """The EXPLAIN of the statement ``claim`` sends (PostgreSQL; nothing is claimed), for
        the benchmark and the test that hold it to index scans."""
        if not self.is_postgres:
            raise NotImplementedError("claim_plan explains the PostgreSQL claim statement")
        params = {
            **_claim_params(model, routed_model, new_token(), time.time()),
            "p_limit": limit,
            "p_batch_size": batch_size,
        }
        compiled = _claim_statement(False).compile(dialect=self.engine.dialect)
        expanded = compiled.construct_expanded_state(params)
        with self._one() as conn:  # EXPLAIN without ANALYZE runs nothing
            rows = conn.exec_driver_sql("EXPLAIN " + expanded.statement, expanded.parameters)
            return [row[0] for row in rows]

    # ------------------------------------------------------------------ execute

    @_on_disconnect_retry
    def start(self, ids: Sequence[int], token: str, worker_id: str, now: float) -> list[WorkItem]:
        """claimed|retrying -> processing for the rows still holding ``token``; returns what
        the attempts need. Rows not returned were reclaimed, cancelled or already done."""
        params = {"p_ids": list(ids), "p_token": token, "p_now": now, "p_worker": worker_id}
        with self._one() as conn:
            rows = conn.execute(_start_statement(self.is_postgres), params)
            if self.is_postgres:
                items = (_work_item(m, token) for m in rows.mappings())
                return sorted(items, key=lambda i: i.id)
            return self._read_items(conn, rows.scalars().all(), token)

    @staticmethod
    def _read_items(conn: Connection, ids: Sequence[int], token: str) -> list[WorkItem]:
        """The attempts' data of rows just started (SQLite, whose RETURNING cannot name the
        joined tables: move, then read)."""
        if not ids:
            return []
        rows = conn.execute(_read_items_statement(), {"p_ids": list(ids)}).mappings()
        return [_work_item(m, token) for m in rows]

    def finish(
        self, results: Sequence[Finish], now: float, hand_off: HandOff | None = None
    ) -> Written:
        """Write back attempts, each fenced on (id, its token, state=processing), in one
        statement whatever their target states.

        With ``hand_off``, the same statement gives every slot it frees (a row written
        completed or failed; a retry keeps its slot) to the next pending request of the
        hand-off's model, claimed straight into ``processing`` for the hand-off's worker under
        a fresh token, and returns those requests for the worker to send at once. Rows leave
        and enter the in-flight count in one atomic statement, so the model's limit holds
        without the claim lock: any concurrent claim counts both or neither. Why: a freed
        slot otherwise travels write-back, refill claim, broker, start statement and only
        then reaches the upstream, which at 1,000 in flight kept each slot idle for about
        130 ms of every 1 s call (benchmark "latency").

        The connection may drop after the statement committed; it is then run again, which
        writes nothing (fenced) and hands off nothing, so the rows the first run started are
        looked up by their token: they are this worker's to run (nobody else holds it)."""
        if not results:
            return Written(0, [])
        rows = [_result_row(f) for f in results]
        params: dict[str, Any] = {"p_now": now}
        if hand_off is not None:
            params.update(
                _claim_params(
                    hand_off.model,
                    hand_off.model,
                    new_token(),
                    now,
                    worker=hand_off.worker_id,
                    stop_before_s=hand_off.stop_before_s,
                )
            )
        runs: list[int] = []
        written = self._write_back(rows, params, hand_off is not None, runs)
        if hand_off is None or len(runs) == 1:
            return written
        started = {i.id: i for i in [*self._held(params["p_token"]), *written.started]}
        return Written(written.changed, sorted(started.values(), key=lambda i: i.id))

    @_on_disconnect_retry
    def _write_back(
        self, rows: list[dict[str, Any]], params: dict[str, Any], hand_off: bool, runs: list[int]
    ) -> Written:
        runs.append(1)  # how many times the transaction ran (``finish``)
        if not self.is_postgres:
            with self._tx() as conn:
                return self._write_back_rows(conn, rows, params, hand_off)
        params = {**params, "p_rows": json.dumps(rows), "p_ids": [row["id"] for row in rows]}
        with self._one() as conn:
            if not hand_off:
                res = conn.execute(_write_back_statement(False), params)
                return Written(max(res.rowcount, 0), [])
            out = conn.execute(_write_back_statement(True), params).mappings().all()
        items = (_work_item(m, params["p_token"]) for m in out if m["id"] is not None)
        return Written(int(out[0]["changed"]), sorted(items, key=lambda i: i.id))

    @_on_disconnect_retry
    def holding(self, results: Sequence[Finish]) -> list[Finish]:
        """The results whose row holds what they wrote (their token and state): after a
        write-back that changed fewer rows than it was given, which of them were written.
        The others were stale (reaped, cancelled or expired meanwhile); counting them as done,
        or scheduling their retries, would misreport the message. Off the hot path: a
        write-back changes every row it is given unless one was taken from it."""
        r = t.requests
        with self._one() as conn:
            rows = conn.execute(
                select(r.c.id, r.c.claim_token, r.c.state).where(
                    r.c.id.in_([f.id for f in results])
                )
            ).all()
        now_held = {(i, token, state) for i, token, state in rows}
        return [f for f in results if (f.id, f.token, f.state.value) in now_held]

    @_on_disconnect_retry
    def _held(self, token: str) -> list[WorkItem]:
        """The rows a hand-off under ``token`` started (``finish``)."""
        with self._one() as conn:
            rows = conn.execute(_held_statement(), {"p_token": token}).mappings()
            return [_work_item(m, token) for m in rows]

    def _write_back_rows(
        self,
        conn: Connection,
        rows: list[dict[str, Any]],
        params: dict[str, Any],
        hand_off: bool,
    ) -> Written:
        """SQLite: an executemany for the rows that end and one for the retries, then the
        hand-off, all in the caller's transaction (SQLite serializes writers, so nothing
        claims in between)."""
        changed = freed = 0
        for ending in (True, False):
            group = [row for row in rows if (row["state"] != S.RETRYING.value) is ending]
            if group:
                many = [
                    {"p_now": params["p_now"], **{"b_" + k: v for k, v in row.items()}}
                    for row in group
                ]
                n = max(conn.execute(_sqlite_write_back_statement(), many).rowcount, 0)
                changed += n
                freed += n if ending else 0
        if not hand_off or freed == 0:
            return Written(changed, [])
        claimed = conn.execute(_sqlite_hand_off_statement(), {**params, "p_room": freed})
        ids = [i for i, _ in claimed]
        if ids:
            marked = {"p_ids": list(ids), "p_now": params["p_now"]}
            conn.execute(_sqlite_mark_started_statement(), marked)
        return Written(changed, self._read_items(conn, ids, params["p_token"]))

    # ------------------------------------------------------------------ batches

    @_on_disconnect_retry
    def get_batch_row(self, batch_id: str) -> dict[str, Any]:
        with self._tx() as conn:
            row = (
                conn.execute(
                    select(t.batches).where(
                        t.batches.c.id == batch_id, t.batches.c.deleted_at.is_(None)
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"no batch {batch_id!r}")
        return dict(row)

    @_on_disconnect_retry
    def request_counts(self, batch_id: str) -> dict[str, int]:
        """Requests of the batch per state (every state present, zero when none)."""
        r = t.requests
        with self._tx() as conn:
            rows = conn.execute(
                select(r.c.state, func.count()).where(r.c.batch_id == batch_id).group_by(r.c.state)
            ).all()
        counts = {s.value: 0 for s in S}
        counts.update({state: n for state, n in rows})
        return counts

    @_on_disconnect_retry
    def list_batches(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                select(t.batches)
                .where(t.batches.c.deleted_at.is_(None))
                .order_by(t.batches.c.created_at.desc(), t.batches.c.id)
                .limit(limit)
            ).mappings()
            return [dict(m) for m in rows]

    def find_resumable_batch(self, sha256: str, upstream_url: str | None) -> str | None:
        """The newest batch made from a file with this content hash (embedded resume)."""
        b, f = t.batches, t.files
        with self._tx() as conn:
            return conn.execute(
                select(b.c.id)
                .join(f, f.c.id == b.c.file_id)
                .where(
                    f.c.sha256 == sha256,
                    f.c.deleted_at.is_(None),
                    b.c.deleted_at.is_(None),
                    b.c.cancelled_at.is_(None),
                    b.c.upstream_url.is_(None)
                    if upstream_url is None
                    else b.c.upstream_url == upstream_url,
                )
                .order_by(b.c.created_at.desc())
                .limit(1)
            ).scalar()

    @_on_disconnect_retry
    def cancel_batch(self, batch_id: str, now: float) -> None:
        """Mark the batch cancelling and every unfinished request canceled, in one
        transaction: pending rows are never claimed, queued messages find their row canceled
        and do nothing, and a late result of an in-flight call fails its fence."""
        r, b = t.requests, t.batches
        with self._tx() as conn:
            row = conn.execute(
                select(b.c.id, b.c.cancelling_at).where(
                    b.c.id == batch_id, b.c.deleted_at.is_(None)
                )
            ).first()
            if row is None:
                raise NotFound(f"no batch {batch_id!r}")
            conn.execute(
                update(b)
                .where(b.c.id == batch_id, _ACTIVE_BATCH, b.c.cancelling_at.is_(None))
                .values(cancelling_at=now)
            )
            conn.execute(
                update(r)
                .where(r.c.batch_id == batch_id, r.c.state.in_(_NOT_TERMINAL))
                .values(
                    state=S.CANCELED.value,
                    canceled_at=now,
                    error=json.dumps(
                        {"kind": ErrorKind.BATCH_CANCELLED.value, "detail": "batch cancelled"}
                    ),
                )
            )

    def iter_result_rows(
        self, batch_id: str, states: Sequence[RequestState], chunk: int = 2000
    ) -> Iterator[dict[str, Any]]:
        """Finished requests of a batch in line order, read in keyset pages so a reader never
        holds a transaction (or the whole result set) open while it streams."""
        r = t.requests
        after = -1
        wanted = [s.value for s in states]
        while True:
            with self._tx() as conn:
                page = (
                    conn.execute(
                        select(
                            r.c.id,
                            r.c.custom_id,
                            r.c.state,
                            r.c.response_status,
                            r.c.response_body,
                            r.c.error,
                        )
                        .where(r.c.batch_id == batch_id, r.c.state.in_(wanted), r.c.id > after)
                        .order_by(r.c.id)
                        .limit(chunk)
                    )
                    .mappings()
                    .all()
                )
            if not page:
                return
            for m in page:
                yield dict(m)
            after = page[-1]["id"]

    @_on_disconnect_retry
    def get_file_row(self, file_id: str) -> dict[str, Any]:
        with self._tx() as conn:
            row = (
                conn.execute(
                    select(t.files).where(t.files.c.id == file_id, t.files.c.deleted_at.is_(None))
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"no file {file_id!r}")
        return dict(row)

    def iter_template_rows(self, file_id: str, chunk: int = 2000) -> Iterator[dict[str, Any]]:
        rt = t.request_templates
        after = -1
        while True:
            with self._tx() as conn:
                page = (
                    conn.execute(
                        select(rt.c.line_number, rt.c.custom_id, rt.c.method, rt.c.url, rt.c.body)
                        .where(rt.c.file_id == file_id, rt.c.line_number > after)
                        .order_by(rt.c.line_number)
                        .limit(chunk)
                    )
                    .mappings()
                    .all()
                )
            if not page:
                return
            yield from (dict(m) for m in page)
            after = page[-1]["line_number"]

    # ------------------------------------------------------------------ maintenance

    @_on_disconnect_retry
    def expire_batches(self, now: float, grace_s: float) -> list[str]:
        """Batches past ``expires_at + grace_s`` with requests unfinished: those fail
        ``batch_expired`` (finished results are kept) and the batch reads ``expired``. A batch
        whose requests all finished in time is left to the finalizer (``completed``), however
        late its finalize pass comes."""
        r, b = t.requests, t.batches
        unfinished = exists(
            select(r.c.id).where(r.c.batch_id == b.c.id, r.c.state.in_(_NOT_TERMINAL))
        )
        expired: list[str] = []
        error = json.dumps(
            {"kind": ErrorKind.BATCH_EXPIRED.value, "detail": "batch expired before completion"}
        )
        with self._tx() as conn:
            ids = (
                conn.execute(
                    select(b.c.id)
                    .where(
                        _ACTIVE_BATCH,
                        b.c.cancelling_at.is_(None),
                        b.c.expires_at + grace_s <= now,
                        unfinished,
                    )
                    # Locked in id order, as finalize_batches does: in different orders, an
                    # expiry and a finalize pass over the same batches could deadlock.
                    .order_by(b.c.id)
                    .with_for_update(of=b)  # against a concurrent finalizer
                )
                .scalars()
                .all()
            )
            for batch_id in ids:
                conn.execute(
                    update(r)
                    .where(r.c.batch_id == batch_id, r.c.state.in_(_NOT_TERMINAL))
                    .values(state=S.FAILED.value, failed_at=now, error=error)
                )
                self._attach_result_files(conn, batch_id, now)
                conn.execute(
                    update(b)
                    .where(b.c.id == batch_id, _ACTIVE_BATCH)
                    .values(
                        finalizing_at=func.coalesce(b.c.finalizing_at, now),
                        expired_at=now,
                        upstream_api_key=None,  # no call of it will run again
                    )
                )
                expired.append(batch_id)
        return expired

    @_on_disconnect_retry
    def finalize_batches(self, now: float, only: Sequence[str] | None = None) -> list[str]:
        """Active batches whose requests are all terminal get their closing timestamps:
        finalizing, then completed / failed (nothing completed) / cancelled. ``only`` limits
        the pass to those batches (a worker finalizing right after its last write-back).
        Finalizers run concurrently (beat's and the workers'), so the batch rows are locked
        and the closing update is conditional: each batch is closed once."""
        r, b = t.requests, t.batches
        unfinished = exists().where(r.c.batch_id == b.c.id, r.c.state.in_(_NOT_TERMINAL))
        done: list[str] = []
        pick = select(b.c.id, b.c.cancelling_at, b.c.total_requests).where(
            _ACTIVE_BATCH, ~unfinished
        )
        if only is not None:
            pick = pick.where(b.c.id.in_(list(only)))
        with self._tx() as conn:
            # Locked in id order, as expire_batches does (against a deadlock between them).
            rows = conn.execute(pick.order_by(b.c.id).with_for_update(of=b)).all()
            for batch_id, cancelling_at, total in rows:
                completed = conn.execute(
                    select(func.count()).where(
                        r.c.batch_id == batch_id, r.c.state == S.COMPLETED.value
                    )
                ).scalar_one()
                self._attach_result_files(conn, batch_id, now)
                values: dict[str, Any] = {
                    "finalizing_at": func.coalesce(b.c.finalizing_at, now),
                    "upstream_api_key": None,  # no call of it will run again
                }
                if cancelling_at is not None:
                    values["cancelled_at"] = now
                elif completed == 0 and total > 0:
                    values["failed_at"] = now
                    values["errors"] = json.dumps(
                        {
                            "data": [
                                {"code": "all_requests_failed", "message": "no request succeeded"}
                            ]
                        }
                    )
                else:
                    values["completed_at"] = now
                conn.execute(update(b).where(b.c.id == batch_id, _ACTIVE_BATCH).values(**values))
                done.append(batch_id)
        return done

    def _attach_result_files(self, conn: Connection, batch_id: str, now: float) -> None:
        """Create the output and error file records of a finished batch. Their contents are
        rendered from the requests when read, so nothing is copied."""
        b, f = t.batches, t.files
        row = conn.execute(
            select(b.c.output_file_id, b.c.error_file_id).where(b.c.id == batch_id)
        ).one()
        values = {}
        for file_column, purpose in (
            ("output_file_id", "batch_output"),
            ("error_file_id", "batch_error"),
        ):
            if row._mapping[file_column] is None:
                file_id = "file-" + uuid.uuid4().hex
                conn.execute(
                    insert(f).values(
                        id=file_id,
                        name=f"{batch_id}_{purpose.split('_')[1]}.jsonl",
                        purpose=purpose,
                        bytes=0,
                        batch_id=batch_id,
                        created_at=now,
                    )
                )
                values[file_column] = file_id
        if values:
            conn.execute(update(b).where(b.c.id == batch_id).values(**values))

    @_on_disconnect_retry
    def reap(
        self,
        now: float,
        claim_timeout_s: float,
        processing_timeout_s: float,
        stale_worker_s: float | None = None,
        limit: int = 10_000,
        max_retries: int | None = None,
        retry_delay_s: float = 0.0,
    ) -> int:
        """Orphaned claims back to pending (token cleared so the next claim stamps a new
        one): claimed past the claim timeout, processing past the processing timeout,
        retrying overdue by the claim timeout, or processing on a worker that is marked dead
        or whose heartbeat is older than ``stale_worker_s``. At most ``limit`` rows per pass,
        so a mass failure does not become one giant transaction.

        A row taken back from ``processing`` had its call started (or about to start) by a
        worker that died, froze or lost it: that counts as an attempt, with the reason
        ``task_terminated``, as any other retriable failure would. It waits ``retry_delay_s``
        before it can be claimed again, and once ``max_retries`` attempts are spent it fails
        with that reason. Why: a request whose call kills its worker every time was retried
        until its batch expired, killing a worker each time. Rows reaped from ``claimed`` or
        ``retrying`` were never sent by this claim: their attempt count is kept."""
        r, w = t.requests, t.workers
        conditions = [
            and_(r.c.state == S.CLAIMED.value, r.c.claimed_at < now - claim_timeout_s),
            and_(r.c.state == S.PROCESSING.value, r.c.started_at < now - processing_timeout_s),
            and_(r.c.state == S.RETRYING.value, r.c.not_before < now - claim_timeout_s),
        ]
        if stale_worker_s is not None:
            dead = select(w.c.id).where(
                or_(w.c.status == "dead", w.c.last_heartbeat < now - stale_worker_s)
            )
            conditions.append(and_(r.c.state == S.PROCESSING.value, r.c.worker_id.in_(dead)))
        was_processing = r.c.state == S.PROCESSING.value
        spent = and_(
            was_processing, r.c.attempt >= (max_retries if max_retries is not None else 2**31 - 1)
        )
        terminated = json.dumps(
            {"kind": ErrorKind.TASK_TERMINATED.value, "detail": TASK_TERMINATED_DETAIL}
        )
        exhausted = json.dumps(
            {
                "kind": ErrorKind.TASK_TERMINATED.value,
                "detail": TASK_TERMINATED_DETAIL,
                "retries_exhausted": True,
            }
        )
        with self._tx() as conn:
            pick = (
                select(r.c.id)
                .where(r.c.state.in_(_IN_FLIGHT), or_(*conditions))
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            res = conn.execute(
                update(r)
                .where(r.c.id.in_(pick.scalar_subquery()), r.c.state.in_(_IN_FLIGHT))
                .values(
                    state=case((spent, S.FAILED.value), else_=S.PENDING.value),
                    failed_at=case((spent, now), else_=r.c.failed_at),
                    attempt=r.c.attempt + case((and_(was_processing, ~spent), 1), else_=0),
                    error=case((spent, exhausted), (was_processing, terminated), else_=r.c.error),
                    not_before=case(
                        (and_(was_processing, ~spent), now + retry_delay_s), else_=r.c.not_before
                    ),
                    claim_token=case((spent, r.c.claim_token), else_=None),
                    worker_id=None,
                )
            )
            return max(res.rowcount, 0)

    def still_held(self, request_id: int, token: str) -> bool:
        """Whether the row is still processing under ``token`` (not reaped, cancelled or
        ended meanwhile); asked before a call only when this worker may have been taken for
        dead (``CancelWatch._lost``)."""
        r = t.requests
        with self._one() as conn:
            return (
                conn.execute(
                    select(r.c.id).where(
                        r.c.id == request_id,
                        r.c.claim_token == token,
                        r.c.state == S.PROCESSING.value,
                    )
                ).first()
                is not None
            )

    @_on_disconnect_retry
    def touch_started(self, held: Iterable[tuple[int, str]], now: float) -> int:
        """Restart the processing clock of rows this worker holds but has not sent yet, or
        has just sent after waiting for one of its ``-c`` slots: ``started_at`` is stamped
        when a message starts its rows, and a row that then waited behind the worker's other
        calls longer than the processing timeout was reaped while alive and sent twice.
        Fenced on each row's token and ``processing``. Off the hot path: only rows that
        waited are touched, by the cancel watcher, a statement per token every few seconds."""
        by_token: dict[str, list[int]] = {}
        for request_id, token in held:
            by_token.setdefault(token, []).append(request_id)
        if not by_token:
            return 0
        r = t.requests
        changed = 0
        with self._tx() as conn:
            for token, ids in by_token.items():
                res = conn.execute(
                    update(r)
                    .where(
                        _ids_bind(self.is_postgres),
                        r.c.claim_token == _p("token", Text),
                        r.c.state == S.PROCESSING.value,
                    )
                    .values(started_at=now),
                    {"p_ids": ids, "p_token": token},
                )
                changed += max(res.rowcount, 0)
        return changed

    # ------------------------------------------------------------------ workers

    @_on_disconnect_retry
    def heartbeat(
        self,
        worker_id: str,
        hostname: str,
        pid: int,
        queues: str,
        now: float,
        concurrency: int | None = None,
    ) -> None:
        """Upsert this worker process's row (registry + liveness + its ``-c``)."""
        w = t.workers
        with self._tx() as conn:
            res = conn.execute(
                update(w)
                .where(w.c.id == worker_id)
                .values(last_heartbeat=now, status="alive", queues=queues, concurrency=concurrency)
            )
            if res.rowcount == 0:
                conn.execute(
                    insert(w).values(
                        id=worker_id,
                        hostname=hostname,
                        pid=pid,
                        queues=queues,
                        started_at=now,
                        last_heartbeat=now,
                        status="alive",
                        concurrency=concurrency,
                    )
                )

    @_on_disconnect_retry
    def mark_worker_dead(self, worker_id: str, now: float) -> None:
        """Clean shutdown: the reaper may take back this worker's rows at once."""
        w = t.workers
        with self._tx() as conn:
            conn.execute(
                update(w).where(w.c.id == worker_id).values(status="dead", last_heartbeat=now)
            )

    def consumer_concurrency(self, queue: str, alive_after: float) -> list[int | None]:
        """The ``-c`` of each live worker consuming ``queue`` (None: not advertised)."""
        w = t.workers
        with self._tx() as conn:
            rows = conn.execute(
                select(w.c.queues, w.c.concurrency).where(
                    w.c.status == "alive", w.c.last_heartbeat >= alive_after
                )
            ).all()
        return [c for queues, c in rows if queue in queues.split(",")]

    def worker_rows(self) -> list[dict[str, Any]]:
        with self._tx() as conn:
            return [dict(m) for m in conn.execute(select(t.workers)).mappings()]

    @_on_disconnect_retry
    def cancelled_among(self, batch_ids: Iterable[str]) -> set[str]:
        """Which of these batches have been cancelled, deleted or expired: the abort poll.
        Expired too: expiry fails the in-flight rows, which frees their slots at once, so a
        call still running would be one more than the model's limit (and its result is
        fenced out anyway)."""
        b = t.batches
        ids = list(set(batch_ids))
        if not ids:
            return set()
        with self._tx() as conn:
            rows = conn.execute(
                select(b.c.id).where(
                    b.c.id.in_(ids),
                    or_(
                        b.c.cancelling_at.is_not(None),
                        b.c.deleted_at.is_not(None),
                        b.c.expired_at.is_not(None),
                    ),
                )
            ).scalars()
            return set(rows)

    # ------------------------------------------------------------------ erasure

    @_on_disconnect_retry
    def delete_batch(self, batch_id: str, now: float) -> None:
        """Soft delete; unfinished requests are cancelled first so nothing runs for it."""
        self.cancel_batch(batch_id, now)
        b = t.batches
        with self._tx() as conn:
            conn.execute(update(b).where(b.c.id == batch_id).values(deleted_at=now))

    @_on_disconnect_retry
    def delete_file(self, file_id: str, now: float) -> None:
        f = t.files
        with self._tx() as conn:
            res = conn.execute(
                update(f).where(f.c.id == file_id, f.c.deleted_at.is_(None)).values(deleted_at=now)
            )
            if res.rowcount == 0:
                raise NotFound(f"no file {file_id!r}")

    @_on_disconnect_retry
    def purge_chunk(self, size: int) -> int:
        """Delete up to ``size`` requests of soft-deleted batches, else up to ``size``
        templates of soft-deleted files that no request references any more. Returns how many
        rows went; 0 means nothing is left to purge.

        A request is made from a template of its own batch's file (``submit``), so a file's
        templates are unreferenced once no batch made from the file has a request left: a
        look-up per file, by batch, where asking per template whether any request names it
        read every request (there is no index on ``template_id``)."""
        r, rt, b, f = t.requests, t.request_templates, t.batches, t.files
        with self._tx() as conn:
            doomed = (
                select(r.c.id)
                .where(r.c.batch_id.in_(select(b.c.id).where(b.c.deleted_at.is_not(None))))
                .limit(size)
            )
            n = conn.execute(delete(r).where(r.c.id.in_(doomed.scalar_subquery()))).rowcount
            if n:
                return max(n, 0)
            # One file a chunk, found by index look-ups (a request of a batch; a template of
            # a file), written so the planner cannot turn them into scans of either table.
            has_request = select(r.c.id).where(r.c.batch_id == b.c.id).limit(1)
            in_use = exists().where(b.c.file_id == f.c.id, has_request.exists())
            unused_file = (
                select(f.c.id)
                .where(
                    f.c.deleted_at.is_not(None),
                    select(rt.c.id).where(rt.c.file_id == f.c.id).limit(1).exists(),
                    ~in_use,
                )
                .limit(1)
                .scalar_subquery()
            )
            doomed_t = (
                select(rt.c.id)
                .where(rt.c.file_id == unused_file)
                .order_by(rt.c.line_number)  # the (file, line) index, not a scan
                .limit(size)
            )
            return max(
                conn.execute(delete(rt).where(rt.c.id.in_(doomed_t.scalar_subquery()))).rowcount, 0
            )

    @_on_disconnect_retry
    def requeue_in_flight(self, batch_id: str) -> int:
        """Embedded resume: the previous process is gone, so its claims are orphans now."""
        r = t.requests
        with self._tx() as conn:
            res = conn.execute(
                update(r)
                .where(r.c.batch_id == batch_id, r.c.state.in_(_IN_FLIGHT))
                .values(state=S.PENDING.value, claim_token=None, worker_id=None, not_before=None)
            )
            return max(res.rowcount, 0)

    # ------------------------------------------------------------------ introspection

    def request_rows(self, batch_id: str) -> list[dict[str, Any]]:
        """Every request of a batch with its state (tests and debugging; not for big batches)."""
        r = t.requests
        with self._tx() as conn:
            return [
                dict(m)
                for m in conn.execute(
                    select(r).where(r.c.batch_id == batch_id).order_by(r.c.id)
                ).mappings()
            ]

    def ping(self) -> None:
        with self._tx() as conn:
            conn.execute(text("SELECT 1"))


__all__ = [
    "Claimed",
    "Finish",
    "HandOff",
    "NotFound",
    "Store",
    "TERMINAL",
    "WorkItem",
    "Written",
    "new_token",
]
