"""Live configuration rows: per-model limits and SLA escalations set while the engine runs.

A row overrides the environment's value for its model; deleting it (``unset``) returns the
model to the environment's value. Every write is one transaction over all the models given,
so a command that names several either changes them all or none."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Table, delete, insert, select

from .. import schema as t
from ..settings import Escalation
from .base import StoreBase, _on_disconnect_retry


@dataclass(frozen=True)
class StoredConfig:
    """What the tables hold: limits, and escalations where ``None`` switches one off."""

    limits: Mapping[str, int]
    escalations: Mapping[str, Escalation | None]


class ConfigStore(StoreBase):
    @_on_disconnect_retry
    def stored_config(self) -> StoredConfig:
        """Both tables (read once per cache period per process)."""
        lim, esc = t.model_limits, t.model_escalations
        with self._one() as conn:
            limits = {m: n for m, n in conn.execute(select(lim.c.model, lim.c.max_in_flight))}
            rows = conn.execute(select(esc.c.model, esc.c.escalation_model, esc.c.threshold_s))
            escalations = {
                m: (Escalation(target, threshold) if target is not None else None)
                for m, target, threshold in rows
            }
        return StoredConfig(limits, escalations)

    def set_limits(self, limits: Mapping[str, int], now: float) -> None:
        self._replace(
            t.model_limits,
            [{"model": m, "max_in_flight": n, "updated_at": now} for m, n in limits.items()],
        )

    def set_escalations(self, escalations: Mapping[str, Escalation | None], now: float) -> None:
        rows = [
            {
                "model": m,
                "escalation_model": e.model if e is not None else None,
                "threshold_s": e.threshold_s if e is not None else 0,
                "updated_at": now,
            }
            for m, e in escalations.items()
        ]
        self._replace(t.model_escalations, rows)

    def unset_limits(self, models: Iterable[str]) -> int:
        return self._delete(t.model_limits, models)

    def unset_escalations(self, models: Iterable[str]) -> int:
        return self._delete(t.model_escalations, models)

    def _replace(self, table: Table, rows: Sequence[Mapping[str, object]]) -> None:
        # Delete then insert in one transaction: an upsert both engines spell the same way.
        if not rows:
            return
        with self._tx() as conn:
            conn.execute(delete(table).where(table.c.model.in_([r["model"] for r in rows])))
            conn.execute(insert(table), rows)

    def _delete(self, table: Table, models: Iterable[str]) -> int:
        names = list(models)
        if not names:
            return 0
        with self._tx() as conn:
            return conn.execute(delete(table).where(table.c.model.in_(names))).rowcount
