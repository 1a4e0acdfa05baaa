"""Files uploaded on their own (``POST /v1/files``) and batches made from them later, and the
owner-scoped listings the HTTP API pages through."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    update,
)

from .. import schema as t
from .base import _IN_FLIGHT, NotFound, S, StoreBase, _on_disconnect_retry
from .submit import SubmitStore, _read_ahead


def _visible(table: Any, owner: str | None, now: float | None = None) -> ColumnElement[bool]:
    """Not deleted, (files) not expired, and the owner's when one is given (None: any)."""
    terms = [table.c.deleted_at.is_(None)]
    if owner is not None:
        terms.append(table.c.owner == owner)
    if now is not None and table is t.files:
        terms.append(or_(table.c.expires_at.is_(None), table.c.expires_at > now))
    return and_(*terms)


def _owned(table: Any, owner: str | None) -> ColumnElement[bool]:
    return true() if owner is None else table.c.owner == owner


def _after(table: Any, cursor: dict[str, Any], newest_first: bool) -> ColumnElement[bool]:
    """Keyset condition for the rows after ``cursor`` in (created_at, id) order."""
    if newest_first:
        return or_(
            table.c.created_at < cursor["created_at"],
            and_(table.c.created_at == cursor["created_at"], table.c.id > cursor["id"]),
        )
    return or_(
        table.c.created_at > cursor["created_at"],
        and_(table.c.created_at == cursor["created_at"], table.c.id > cursor["id"]),
    )


class FileStore(StoreBase):
    """Uploads, batches from an uploaded file, owner-scoped reads and pages."""

    def store_file(
        self,
        file_row: dict[str, Any],
        template_chunks: Iterable[list[dict[str, Any]]],
        make_file: Callable[[], dict[str, Any]],
    ) -> None:
        """Insert a file and its templates; ``template_chunks`` validates as it is consumed
        (an upload: as the body arrives) and ``make_file()`` gives the columns known once it
        is all read. A refused file leaves no rows (invariant 7).

        PostgreSQL: one transaction, COPY per chunk, the next chunk parsed meanwhile. SQLite
        has one writer at a time, and an upload arrives at the client's pace: a transaction
        open all that time would stall every worker write-back and read of the embedded
        server. So there each chunk commits by itself under a file row that reads as deleted
        until the last, and a refused file's rows are deleted again."""
        rt = t.request_templates
        if self.is_postgres:
            with self._tx() as conn:
                conn.execute(insert(t.files), [file_row])
                for chunk in _read_ahead(template_chunks):
                    if chunk:
                        SubmitStore._copy_rows(conn, rt, chunk)
                conn.execute(
                    update(t.files).where(t.files.c.id == file_row["id"]).values(**make_file())
                )
            return
        hidden = {**file_row, "deleted_at": file_row["created_at"]}
        with self._tx() as conn:
            conn.execute(insert(t.files), [hidden])
        try:
            for chunk in template_chunks:
                if chunk:
                    with self._tx() as conn:
                        conn.execute(insert(rt), chunk)
            done = make_file()
            with self._tx() as conn:
                conn.execute(
                    update(t.files)
                    .where(t.files.c.id == file_row["id"])
                    .values(**done, deleted_at=None)
                )
        except BaseException:
            with self._tx() as conn:
                conn.execute(delete(rt).where(rt.c.file_id == file_row["id"]))
                conn.execute(delete(t.files).where(t.files.c.id == file_row["id"]))
            raise

    @_on_disconnect_retry
    def create_batch_from_file(
        self, batch_row: dict[str, Any], result_files: list[dict[str, Any]]
    ) -> None:
        """The batch row, its result files and one pending request per line of its input
        file, in one transaction (one INSERT ... SELECT over the file's templates)."""
        rt = t.request_templates
        rows = select(
            literal(batch_row["id"]),
            rt.c.id,
            rt.c.custom_id,
            rt.c.model,
            literal(S.PENDING.value),
            literal(batch_row["expires_at"]),
        ).where(rt.c.file_id == batch_row["file_id"])
        with self._tx() as conn:
            conn.execute(insert(t.files), result_files)
            conn.execute(insert(t.batches), [batch_row])
            conn.execute(
                insert(t.requests).from_select(
                    ["batch_id", "template_id", "custom_id", "model", "state", "deadline"],
                    rows.order_by(rt.c.line_number),
                )
            )

    @_on_disconnect_retry
    def file_row(self, file_id: str, owner: str | None, now: float) -> dict[str, Any]:
        """A file the owner may read (None: any owner); NotFound otherwise."""
        f = t.files
        with self._tx() as conn:
            row = (
                conn.execute(select(f).where(f.c.id == file_id, _visible(f, owner, now)))
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"no file {file_id!r}")
        return dict(row)

    @_on_disconnect_retry
    def list_files(
        self,
        owner: str | None,
        now: float,
        limit: int,
        newest_first: bool = True,
        after: str | None = None,
        purpose: str | None = None,
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` files in (created_at, id) order, after the file ``after``."""
        f = t.files
        query = select(f).where(_visible(f, owner, now))
        if purpose is not None:
            query = query.where(f.c.purpose == purpose)
        with self._tx() as conn:
            if after is not None:
                cursor = conn.execute(
                    select(f.c.created_at, f.c.id).where(f.c.id == after, _owned(f, owner))
                ).first()
                if cursor is None:
                    raise NotFound(f"no file {after!r}")
                query = query.where(_after(f, dict(cursor._mapping), newest_first))
            order = f.c.created_at.desc() if newest_first else f.c.created_at
            rows = conn.execute(query.order_by(order, f.c.id).limit(limit)).mappings()
            return [dict(m) for m in rows]

    @_on_disconnect_retry
    def list_batch_page(
        self, owner: str | None, limit: int, after: str | None = None
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` batches, newest first, after the batch ``after``."""
        b = t.batches
        query = select(b).where(_visible(b, owner))
        with self._tx() as conn:
            if after is not None:
                cursor = conn.execute(
                    select(b.c.created_at, b.c.id).where(b.c.id == after, _owned(b, owner))
                ).first()
                if cursor is None:
                    raise NotFound(f"no batch {after!r}")
                query = query.where(_after(b, dict(cursor._mapping), True))
            rows = conn.execute(
                query.order_by(b.c.created_at.desc(), b.c.id).limit(limit)
            ).mappings()
            return [dict(m) for m in rows]

    @_on_disconnect_retry
    def in_flight_by_model(self, batch_ids: list[str]) -> dict[str, int]:
        """Requests of these batches in flight (claimed, processing, retrying), per routed
        model: what the page shows beside each model's limit. Index-bound per batch."""
        r = t.requests
        if not batch_ids:
            return {}
        model = func.coalesce(r.c.routed_model, r.c.model)
        with self._tx() as conn:
            rows = conn.execute(
                select(model, func.count())
                .where(r.c.batch_id.in_(batch_ids), r.c.state.in_(_IN_FLIGHT))
                .group_by(model)
            ).all()
        return {str(m): int(n) for m, n in rows}
