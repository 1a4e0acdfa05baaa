"""What the metrics exporter reads: the cluster-wide gauges, in one short transaction.

Each count is served by an index: pending rows by model (``ix_requests_pending``), in-flight
rows by routed model and state (``ix_requests_in_flight``); the batches and workers tables
hold a row per batch and per worker process, not per request."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, case, func, literal_column, select

from .. import schema as t
from ..states import BatchStatus
from .base import _IN_FLIGHT, S, StoreBase, _on_disconnect_retry


@dataclass(frozen=True)
class ClusterGauges:
    #: (model, state, requests) for the states that are not terminal. Pending rows count for
    #: the model they were submitted for; in-flight rows (claimed, processing, retrying) for
    #: the model whose queue and limit hold them (the escalation model once escalated).
    queue_depth: list[tuple[str, str, int]]
    #: Batch status -> batches (deleted batches left out).
    batches: dict[str, int]
    workers_alive: int


def _batch_status() -> ColumnElement[str]:
    """The status ``states.batch_status`` derives from a batch's timestamps, as SQL. The
    names are inlined, not bound: the GROUP BY must repeat the select's expression exactly."""
    b = t.batches

    def name(status: BatchStatus) -> ColumnElement[str]:
        return literal_column(f"'{status.value}'")

    return case(
        (b.c.cancelled_at.is_not(None), name(BatchStatus.CANCELLED)),
        (b.c.expired_at.is_not(None), name(BatchStatus.EXPIRED)),
        (b.c.failed_at.is_not(None), name(BatchStatus.FAILED)),
        (b.c.completed_at.is_not(None), name(BatchStatus.COMPLETED)),
        (b.c.cancelling_at.is_not(None), name(BatchStatus.CANCELLING)),
        (b.c.finalizing_at.is_not(None), name(BatchStatus.FINALIZING)),
        (b.c.in_progress_at.is_not(None), name(BatchStatus.IN_PROGRESS)),
        else_=name(BatchStatus.VALIDATING),
    )


class MetricsStore(StoreBase):
    """The exporter's reads (``exporter.py``)."""

    @_on_disconnect_retry
    def cluster_gauges(self, alive_after: float) -> ClusterGauges:
        """Queue depth by model and state, batches by status, and the worker processes
        whose heartbeat is newer than ``alive_after`` and not marked dead."""
        r, b, w = t.requests, t.batches, t.workers
        status = _batch_status()
        with self._tx() as conn:
            pending = conn.execute(
                select(r.c.model, func.count())
                .where(r.c.state == S.PENDING.value)
                .group_by(r.c.model)
            ).all()
            in_flight = conn.execute(
                select(r.c.routed_model, r.c.state, func.count())
                .where(r.c.state.in_(_IN_FLIGHT))
                .group_by(r.c.routed_model, r.c.state)
            ).all()
            batches = conn.execute(
                select(status, func.count()).where(b.c.deleted_at.is_(None)).group_by(status)
            ).all()
            alive = conn.execute(
                select(func.count()).where(w.c.status == "alive", w.c.last_heartbeat > alive_after)
            ).scalar_one()
        depth = [(m, S.PENDING.value, n) for m, n in pending]
        depth += [(m or "", state, n) for m, state, n in in_flight]
        return ClusterGauges(depth, {s: n for s, n in batches}, int(alive))
