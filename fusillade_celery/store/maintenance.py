"""Maintenance statements: expiry, finalize, the reaper, purge, the embedded resume."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Update,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)

from .. import schema as t
from ..states import ErrorKind
from .base import (
    _ACTIVE_BATCH,
    _IN_FLIGHT,
    _NOT_TERMINAL,
    TASK_TERMINATED_DETAIL,
    S,
    StoreBase,
    _on_disconnect_retry,
)


def _add(into: dict[str, int] | None, counts: dict[str, int]) -> None:
    """Add ``counts`` to a caller's tally, once the transaction that made them committed."""
    if into is not None:
        for key, n in counts.items():
            into[key] = into.get(key, 0) + n


class MaintenanceStore(StoreBase):
    """What beat's periodic tasks and the embedded loop run."""

    def _update_counted(
        self, conn: Connection, stmt: Update, *keys: ColumnElement[Any]
    ) -> list[tuple[Any, ...]]:
        """Run ``stmt`` and count the rows it changed by ``keys`` (their values after it):
        ``(key values..., count)`` rows. For the metrics of bulk moves (expiry, the reaper),
        exact and without a query of their own: PostgreSQL counts in the same statement (the
        UPDATE as a CTE), SQLite returns the keys of each row changed (its scale is small)."""
        labelled = [k.label(f"k{i}") for i, k in enumerate(keys)]
        if self.is_postgres:
            changed = stmt.returning(*labelled).cte("changed")
            cols = [changed.c[f"k{i}"] for i in range(len(keys))]
            rows = conn.execute(select(*cols, func.count()).group_by(*cols))
            return [tuple(row) for row in rows]
        counts = Counter(tuple(row) for row in conn.execute(stmt.returning(*labelled)))
        return [(*key, n) for key, n in counts.items()]

    @_on_disconnect_retry
    def expire_batches(
        self, now: float, grace_s: float, failed_by_model: dict[str, int] | None = None
    ) -> list[str]:
        """Batches past ``expires_at + grace_s`` with requests unfinished: those fail
        ``batch_expired`` (finished results are kept) and the batch reads ``expired``. A batch
        whose requests all finished in time is left to the finalizer (``completed``), however
        late its finalize pass comes. ``failed_by_model``, when given, gets the requests
        failed here per routed model (else requested model), for the metrics."""
        r, b = t.requests, t.batches
        unfinished = exists(
            select(r.c.id).where(r.c.batch_id == b.c.id, r.c.state.in_(_NOT_TERMINAL))
        )
        expired: list[str] = []
        failed: dict[str, int] = {}  # handed over once committed (a retried run starts over)
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
                fail = (
                    update(r)
                    .where(r.c.batch_id == batch_id, r.c.state.in_(_NOT_TERMINAL))
                    .values(state=S.FAILED.value, failed_at=now, error=error)
                )
                if failed_by_model is None:
                    conn.execute(fail)
                else:
                    model = func.coalesce(r.c.routed_model, r.c.model)
                    for name, n in self._update_counted(conn, fail, model):
                        failed[name] = failed.get(name, 0) + n
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
        _add(failed_by_model, failed)
        return expired

    @_on_disconnect_retry
    def finalize_batches(
        self,
        now: float,
        only: Sequence[str] | None = None,
        cancelled: dict[str, int] | None = None,
    ) -> list[str]:
        """Active batches whose requests are all terminal get their closing timestamps:
        finalizing, then completed / failed (nothing completed) / cancelled. ``only`` limits
        the pass to those batches (a worker finalizing right after its last write-back).
        Finalizers run concurrently (beat's and the workers'), so the batch rows are locked
        and the closing update is conditional: each batch is closed once. ``cancelled``,
        when given, gets each batch closed cancelled with its canceled requests (one count
        per such batch), for the metrics: counted here, once, in a worker, whichever process
        issued the cancel."""
        r, b = t.requests, t.batches
        unfinished = exists().where(r.c.batch_id == b.c.id, r.c.state.in_(_NOT_TERMINAL))
        done: list[str] = []
        closed_cancelled: dict[str, int] = {}
        pick = select(b.c.id, b.c.cancelling_at, b.c.total_requests).where(
            _ACTIVE_BATCH, ~unfinished
        )
        if only is not None:
            pick = pick.where(b.c.id.in_(list(only)))
        ran_out_of_time = select(r.c.id).where(
            r.c.batch_id == bindparam("batch"),
            r.c.state == S.FAILED.value,
            # the kind, as json.dumps writes it (quotes in a detail are escaped: no match)
            r.c.error.contains(f'"kind": "{ErrorKind.BATCH_EXPIRED.value}"'),
        )
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
                    if cancelled is not None:
                        closed_cancelled[batch_id] = conn.execute(
                            select(func.count()).where(
                                r.c.batch_id == batch_id, r.c.state == S.CANCELED.value
                            )
                        ).scalar_one()
                elif conn.execute(ran_out_of_time, {"batch": batch_id}).first() is not None:
                    # Requests not sent because the deadline came first (upstream.attempt)
                    # ended before the expiry pass did: the batch expired all the same.
                    values["expired_at"] = now
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
        _add(cancelled, closed_cancelled)
        return done

    def _attach_result_files(self, conn: Connection, batch_id: str, now: float) -> None:
        """Create the output and error file records of a finished batch. Their contents are
        rendered from the requests when read, so nothing is copied."""
        b, f = t.batches, t.files
        row = conn.execute(
            select(b.c.output_file_id, b.c.error_file_id, b.c.owner).where(b.c.id == batch_id)
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
                        owner=row._mapping["owner"],
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
        failed_by_model: dict[str, int] | None = None,
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
        ``retrying`` were never sent by this claim: their attempt count is kept.
        ``failed_by_model``, when given, gets the requests failed here per routed model
        (for the metrics: ``task_terminated``)."""
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
            reap = (
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
            if failed_by_model is None:
                return max(conn.execute(reap).rowcount, 0)
            model = func.coalesce(r.c.routed_model, r.c.model)
            moved = self._update_counted(conn, reap, r.c.state, model)
        _add(failed_by_model, {name: n for state, name, n in moved if state == S.FAILED.value})
        return sum(n for *_, n in moved)

    @_on_disconnect_retry
    def purge_chunk(self, size: int) -> int:
        """Delete up to ``size`` requests of soft-deleted batches (with their ``/v1/responses``
        loop steps), else up to ``size``
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
            ids = conn.execute(doomed).scalars().all()
            if ids:
                # The /v1/responses loop's steps go with their request (its payloads too).
                s = t.response_steps
                conn.execute(delete(s).where(s.c.request_id.in_(ids)))
                return max(conn.execute(delete(r).where(r.c.id.in_(ids))).rowcount, 0)
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
    def requeue_in_flight(self, batch_id: str | None) -> int:
        """Embedded resume: the previous process is gone, so its claims are orphans now
        (``None``: every batch's, as an embedded server starts)."""
        r = t.requests
        which: ColumnElement[bool] = r.c.state.in_(_IN_FLIGHT)
        if batch_id is not None:
            which = and_(r.c.batch_id == batch_id, which)
        with self._tx() as conn:
            res = conn.execute(
                update(r)
                .where(which)
                .values(state=S.PENDING.value, claim_token=None, worker_id=None, not_before=None)
            )
            return max(res.rowcount, 0)
