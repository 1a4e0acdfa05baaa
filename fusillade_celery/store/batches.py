"""Reading and changing batches and files as users do: the Batch row, counts, results,
cancel, soft delete."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import (
    func,
    or_,
    select,
    text,
    update,
)

from .. import schema as t
from ..states import ErrorKind, RequestState
from .base import (
    _ACTIVE_BATCH,
    _NOT_TERMINAL,
    NotFound,
    S,
    StoreBase,
    _on_disconnect_retry,
)


class BatchStore(StoreBase):
    """Batches and files as the submit helper, the CLI and the API read and change them."""

    @_on_disconnect_retry
    def get_batch_row(self, batch_id: str, owner: str | None = None) -> dict[str, Any]:
        """The batch's row; NotFound when deleted or (``owner`` given) another owner's."""
        b = t.batches
        where = [b.c.id == batch_id, b.c.deleted_at.is_(None)]
        if owner is not None:
            where.append(b.c.owner == owner)
        with self._one() as conn:  # one SELECT: no BEGIN/COMMIT round trips on PostgreSQL
            row = conn.execute(select(b).where(*where)).mappings().first()
        if row is None:
            raise NotFound(f"no batch {batch_id!r}")
        return dict(row)

    @_on_disconnect_retry
    def request_counts(self, batch_id: str) -> dict[str, int]:
        """Requests of the batch per state (every state present, zero when none)."""
        r = t.requests
        with self._one() as conn:
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
        """The newest batch made from a file with this content hash and upstream, not
        cancelled or deleted: what ``run`` resumes (embedded) or follows (with a broker; it
        may have finished meanwhile, and then its results are written, not the file sent
        again)."""
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
                .values(cancelling_at=now, upstream_api_key=None)  # no call of it will start
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
                            r.c.batch_id,
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
    def retry_failed(self, batch_id: str, now: float, expires_at: float) -> int:
        """Failed requests of a finished batch back to pending, the batch running again
        under the deadline ``expires_at`` (a user's explicit retry: the one way a terminal
        request moves again, invariant 1). Cancelled requests stay cancelled. Returns how
        many went back; 0 (nothing changed) when the batch is not finished or has none."""
        r, b = t.requests, t.batches
        finished = or_(
            b.c.completed_at.is_not(None), b.c.failed_at.is_not(None), b.c.expired_at.is_not(None)
        )
        with self._tx() as conn:
            batch = conn.execute(
                select(b.c.id).where(
                    b.c.id == batch_id,
                    finished,
                    b.c.cancelling_at.is_(None),
                    b.c.deleted_at.is_(None),
                )
            ).first()
            if batch is None:
                return 0
            moved = conn.execute(
                update(r)
                .where(r.c.batch_id == batch_id, r.c.state == S.FAILED.value)
                .values(
                    state=S.PENDING.value,
                    attempt=0,
                    claim_token=None,
                    worker_id=None,
                    routed_model=None,
                    not_before=None,
                    claimed_at=None,
                    started_at=None,
                    failed_at=None,
                    response_status=None,
                    response_body=None,
                    error=None,
                    deadline=expires_at,
                )
            ).rowcount
            if moved:
                conn.execute(
                    update(b)
                    .where(b.c.id == batch_id)
                    .values(
                        expires_at=expires_at,
                        finalizing_at=None,
                        completed_at=None,
                        failed_at=None,
                        expired_at=None,
                        errors=None,
                    )
                )
            return max(moved, 0)

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

    @_on_disconnect_retry
    def delete_batch(self, batch_id: str, now: float) -> None:
        """Soft delete; unfinished requests are cancelled first so nothing runs for it."""
        self.cancel_batch(batch_id, now)
        b = t.batches
        with self._tx() as conn:
            conn.execute(
                update(b).where(b.c.id == batch_id).values(deleted_at=now, upstream_api_key=None)
            )

    @_on_disconnect_retry
    def delete_file(self, file_id: str, now: float) -> None:
        f = t.files
        with self._tx() as conn:
            res = conn.execute(
                update(f).where(f.c.id == file_id, f.c.deleted_at.is_(None)).values(deleted_at=now)
            )
            if res.rowcount == 0:
                raise NotFound(f"no file {file_id!r}")

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
