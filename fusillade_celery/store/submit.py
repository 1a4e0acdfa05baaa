"""Storing a submitted file: the file, its batch, templates and requests in one transaction."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    bindparam,
    insert,
    literal,
    select,
    update,
)

from .. import schema as t
from .base import (
    S,
    StoreBase,
)


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


class SubmitStore(StoreBase):
    """Inserts a validated file and its batch (``Store.submit``)."""

    def submit(
        self,
        file_row: dict[str, Any],
        batch_row: dict[str, Any],
        template_chunks: Iterable[list[dict[str, Any]]],
        make_batch: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
        result_files: Sequence[dict[str, Any]] = (),
    ) -> str:
        """Insert the file, the batch, its templates and one request per line, in one
        transaction. ``template_chunks`` validates as it is consumed: an error raised there
        rolls everything back, so a refused file leaves no rows (invariant 7).
        ``make_batch()`` returns (batch columns, file columns) to update once the whole file
        has been read (count, models, size and hash are known only then). ``result_files``:
        the batch's output and error file rows, made with it.

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
            if result_files:  # a separate statement: an executemany takes the first row's keys
                conn.execute(insert(t.files), list(result_files))
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
