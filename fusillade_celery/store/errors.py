"""The last upstream failure per model: written by the workers, rate-limited
(``failures.FailureLog``), read by ``status``, ``top`` and ``limits``.

One row per (routed) model, upserted: a row is replaced by a newer failure only, so two
workers writing out of order keep the later one, and its count adds what each write stands
for."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, case, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .. import schema as t
from .base import StoreBase, _on_disconnect_retry


@dataclass(frozen=True)
class ModelError:
    """One model's last upstream failure. ``message`` is short (a body snippet at most, no
    key); ``host`` the upstream's host[:port]; ``count`` the failures counted since the row
    was made (in a write: how many failures it stands for)."""

    model: str
    kind: str
    status_code: int | None
    message: str
    host: str | None
    at: float
    count: int = 1

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``status`` prints."""
        return {
            "kind": self.kind,
            "status_code": self.status_code,
            "message": self.message,
            "host": self.host,
            "at": self.at,
            "count": self.count,
        }


#: The length of the message and host columns (``schema.model_errors``).
_TEXT_MAX = 512
#: Replaced by a newer failure only (see the module doc).
_REPLACED = ("kind", "status_code", "message", "host", "last_at")


class ErrorStore(StoreBase):
    @_on_disconnect_retry
    def record_model_error(self, error: ModelError) -> None:
        """Upsert ``error`` as its model's last failure, adding ``error.count`` to the row's."""
        e = t.model_errors
        insert = pg_insert if self.is_postgres else sqlite_insert
        stmt = insert(e).values(
            model=error.model,
            kind=error.kind,
            status_code=error.status_code,
            message=error.message[:_TEXT_MAX],
            host=error.host[:_TEXT_MAX] if error.host else None,
            last_at=error.at,
            error_count=error.count,
        )
        newer = stmt.excluded.last_at >= e.c.last_at
        changes: dict[str, Any] = {
            c: case((newer, stmt.excluded[c]), else_=e.c[c]) for c in _REPLACED
        }
        changes["error_count"] = e.c.error_count + stmt.excluded.error_count
        with self._tx() as conn:
            conn.execute(stmt.on_conflict_do_update(index_elements=[e.c.model], set_=changes))

    @_on_disconnect_retry
    def model_errors(self, models: Iterable[str] | None = None) -> dict[str, ModelError]:
        """The last failure of each model (of ``models`` only, when given)."""
        with self._tx() as conn:
            return self._model_errors(conn, models)

    @staticmethod
    def _model_errors(
        conn: Connection, models: Iterable[str] | None = None
    ) -> dict[str, ModelError]:
        e = t.model_errors
        query = select(
            e.c.model,
            e.c.kind,
            e.c.status_code,
            e.c.message,
            e.c.host,
            e.c.last_at,
            e.c.error_count,
        )
        if models is not None:
            names = sorted(set(models))
            if not names:
                return {}
            query = query.where(e.c.model.in_(names))
        return {row[0]: ModelError(*row) for row in conn.execute(query.order_by(e.c.model))}
