"""What operators watch (``status``, ``top``, ``limits``): per model, the requests waiting,
in flight and retrying with the model's last upstream failure; per active batch, its progress.

Every count here is answered from an index alone (the partial pending and in-flight indexes,
or the batch-and-state index), never from a scan of the requests table, so a view refreshed
every second stays cheap next to millions of rows."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, or_, select

from .. import schema as t
from ..output import TIMESTAMPS
from ..states import BatchStatus, batch_status
from .base import _ACTIVE_BATCH, _IN_FLIGHT, _NOT_TERMINAL, S, _on_disconnect_retry
from .errors import ErrorStore, ModelError


@dataclass(frozen=True)
class ModelOverview:
    """One model's load. ``in_flight`` is claimed + processing; ``retrying`` rows wait out
    their backoff and still hold a slot, so the model's limit bounds ``in_flight +
    retrying``. ``pending`` rows are waiting to be claimed. In-flight and retrying rows count
    for the model they were routed to (an escalation model's queue and limit), pending ones
    for the model their line names."""

    model: str
    in_flight: int = 0
    pending: int = 0
    retrying: int = 0
    last_error: ModelError | None = None

    def last_error_dict(self) -> dict[str, Any] | None:
        """The last error as JSON (``ModelError.as_dict``), None when there is none."""
        return self.last_error.as_dict() if self.last_error is not None else None


@dataclass(frozen=True)
class BatchProgress:
    """A batch as ``top`` draws it. ``failed`` includes canceled requests, as the Batch
    object's ``request_counts`` does, so ``completed + failed == total`` once it ends."""

    id: str
    status: BatchStatus
    created_at: float
    expires_at: float
    models: tuple[str, ...]
    total: int
    completed: int
    failed: int
    pending: int
    in_flight: int
    retrying: int

    @property
    def done(self) -> int:
        return self.completed + self.failed


def _add(counts: dict[str, dict[str, int]], model: str, state: str, n: int) -> None:
    key = {S.PENDING.value: "pending", S.RETRYING.value: "retrying"}.get(state, "in_flight")
    per = counts.setdefault(model, {})
    per[key] = per.get(key, 0) + n


def _overviews(
    counts: dict[str, dict[str, int]], errors: dict[str, ModelError]
) -> list[ModelOverview]:
    return [
        ModelOverview(m, last_error=errors.get(m), **counts.get(m, {}))
        for m in sorted(set(counts) | set(errors))
    ]


#: Requests of a batch that are not completed: counted per state from the batch-and-state
#: index; ``completed`` is the batch's total minus them (it is most of a batch's rows).
_NOT_COMPLETED = sorted({*_NOT_TERMINAL, S.FAILED.value, S.CANCELED.value})


#: What ``BatchProgress`` needs of a batch row (its status is read from the timestamps).
_PROGRESS_COLUMNS = ("id", "models", "total_requests", *TIMESTAMPS, "deleted_at")


class OverviewStore(ErrorStore):
    @_on_disconnect_retry
    def model_overview(self, now: float) -> list[ModelOverview]:
        """Every model with requests waiting, in flight or retrying, or with a recorded
        failure, in name order: two GROUP BYs, each an index-only scan of its partial index (the
        in-flight rows by routed model and state; the pending rows of batches whose deadline
        is after ``now``, by model), and the ``model_errors`` rows. Models with nothing
        running and no failure are absent (their counts are all zero)."""
        r = t.requests
        counts: dict[str, dict[str, int]] = {}
        with self._tx() as conn:
            flying = conn.execute(
                select(r.c.routed_model, r.c.state, func.count())
                .where(r.c.state.in_(_IN_FLIGHT))
                .group_by(r.c.routed_model, r.c.state)
            )
            for model, state, n in flying:
                _add(counts, model, state, n)
            pending = conn.execute(
                select(r.c.model, func.count())
                .where(r.c.state == S.PENDING.value, r.c.deadline > now)
                .group_by(r.c.model)
            )
            for model, n in pending:
                _add(counts, model, S.PENDING.value, n)
            errors = self._model_errors(conn)
        return _overviews(counts, errors)

    @_on_disconnect_retry
    def batch_overview(self, batch_id: str) -> list[ModelOverview]:
        """``model_overview`` for one batch's unfinished requests (every model of the batch
        present), with each model's last failure, which is the model's, not the batch's.
        Reads the batch's unfinished rows by the batch-and-state index: for ``status``."""
        r = t.requests
        counts: dict[str, dict[str, int]] = {}
        with self._tx() as conn:
            raw = conn.execute(select(t.batches.c.models).where(t.batches.c.id == batch_id))
            for model in json.loads(raw.scalar() or "[]"):
                counts.setdefault(model, {})
            rows = conn.execute(
                select(r.c.model, r.c.routed_model, r.c.state, func.count())
                .where(r.c.batch_id == batch_id, r.c.state.in_(_NOT_TERMINAL))
                .group_by(r.c.model, r.c.routed_model, r.c.state)
            )
            for model, routed, state, n in rows:
                key = model if state == S.PENDING.value else (routed or model)
                _add(counts, key, state, n)
            errors = self._model_errors(conn, counts)
        return _overviews(counts, {m: e for m, e in errors.items() if m in counts})

    @_on_disconnect_retry
    def batch_progress(self, also: Iterable[str] = (), limit: int = 50) -> list[BatchProgress]:
        """The running batches (and the batches ``also`` names, such as ones that just
        ended), oldest first, at most ``limit``: their rows by the active-batch index, and
        their requests that are not completed counted per state by the batch-and-state
        index (an index-only count of what is left, not of what is done)."""
        b, r = t.batches, t.requests
        extra = sorted(set(also))
        where = or_(_ACTIVE_BATCH, b.c.id.in_(extra)) if extra else _ACTIVE_BATCH
        with self._tx() as conn:
            batches = (
                conn.execute(
                    select(*(b.c[c] for c in _PROGRESS_COLUMNS))
                    .where(where)
                    .order_by(b.c.created_at, b.c.id)
                    .limit(limit)
                )
                .mappings()
                .all()
            )
            ids = [row["id"] for row in batches]
            counts: dict[str, dict[str, int]] = {i: {} for i in ids}
            if ids:
                rows = conn.execute(
                    select(r.c.batch_id, r.c.state, func.count())
                    .where(r.c.batch_id.in_(ids), r.c.state.in_(_NOT_COMPLETED))
                    .group_by(r.c.batch_id, r.c.state)
                )
                for batch_id, state, n in rows:
                    counts[batch_id][state] = n
        return [_progress(dict(row), counts[row["id"]]) for row in batches]


def _progress(m: Mapping[str, Any], counts: dict[str, int]) -> BatchProgress:
    total = int(m["total_requests"])
    return BatchProgress(
        id=m["id"],
        status=batch_status(m),
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        models=tuple(json.loads(m["models"])),
        total=total,
        completed=max(total - sum(counts.values()), 0),
        failed=counts.get(S.FAILED.value, 0) + counts.get(S.CANCELED.value, 0),
        pending=counts.get(S.PENDING.value, 0),
        in_flight=counts.get(S.CLAIMED.value, 0) + counts.get(S.PROCESSING.value, 0),
        retrying=counts.get(S.RETRYING.value, 0),
    )
