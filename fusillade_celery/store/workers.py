"""The worker registry: heartbeats, liveness, consumers of a queue, the cancel poll."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    insert,
    or_,
    select,
    update,
)

from .. import schema as t
from .base import (
    StoreBase,
    _on_disconnect_retry,
)


class WorkerStore(StoreBase):
    """Worker rows and what the claimer and the cancel watcher ask of them."""

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
