"""The hot statements, built once per shape (``functools.cache``): the claim (count,
pick, claim, mark started), the start, the write-back and the hand-off. Building a statement
of CTEs took a worker about 5 ms of CPU, more than the server took to run it."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    Float,
    Integer,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    column,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from .. import schema as t
from .base import (
    _IN_FLIGHT,
    _RESULT_COLUMNS,
    RETRY_EARLY_TOLERANCE_S,
    S,
    _fence_state,
    _ids_bind,
    _p,
    _start_columns,
    _write_back_values,
)


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
                r.c.not_before.is_(None),
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
