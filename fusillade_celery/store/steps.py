"""The ``/v1/responses`` loop's steps (``response_steps``): read once when a request's loop
starts, written as each model or tool call starts and ends.

Every write is fenced like a write-back: it happens only while the request is ``processing``
under the writer's claim token, so a worker whose row was taken back (reaped while frozen or
cut off) cannot record steps over those of the worker now running the chain. A fence that
fails tells the loop to stop: its result would be refused anyway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, exists, insert, select, update

from .. import schema as t
from ..states import RequestState
from .base import StoreBase, _on_disconnect_retry

MODEL_CALL = "model_call"
TOOL_CALL = "tool_call"
STARTED = "started"
COMPLETED = "completed"
FAILED = "failed"


@dataclass(frozen=True)
class Step:
    """One recorded step. ``request`` and ``response`` are decoded JSON (None if unset)."""

    id: int
    parent_id: int | None
    seq: int
    kind: str
    name: str | None
    call_id: str | None
    state: str
    attempts: int
    request: Any
    response: Any
    created_at: float


@dataclass(frozen=True)
class NewStep:
    """A step about to start: ``id`` is the row of an earlier try of it (sent again)."""

    parent_id: int | None
    seq: int
    kind: str
    name: str
    request: Any
    call_id: str | None = None
    id: int | None = None


def _held(request_id: int, token: str) -> Any:
    """The fence: the request is processing under ``token``."""
    r = t.requests
    return exists().where(
        r.c.id == request_id,
        r.c.claim_token == token,
        r.c.state == RequestState.PROCESSING.value,
    )


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class StepStore(StoreBase):
    @_on_disconnect_retry
    def steps_of(self, request_id: int) -> list[Step]:
        """Every step recorded for the request, in order within each loop."""
        s = t.response_steps
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(s).where(s.c.request_id == request_id).order_by(s.c.parent_id, s.c.seq)
            ).mappings()
            return [
                Step(
                    id=m["id"],
                    parent_id=m["parent_id"],
                    seq=m["seq"],
                    kind=m["kind"],
                    name=m["name"],
                    call_id=m["call_id"],
                    state=m["state"],
                    attempts=m["attempts"],
                    request=_load(m["request"]),
                    response=_load(m["response"]),
                    created_at=m["created_at"],
                )
                for m in rows
            ]

    @_on_disconnect_retry
    def begin_steps(
        self, request_id: int, token: str, steps: list[NewStep], now: float
    ) -> list[int] | None:
        """Record ``steps`` as started, in one transaction (siblings together), before their
        calls are sent: a step found ``started`` later was interrupted. Returns their ids, or
        None when the request is no longer held under ``token`` (nothing written)."""
        r = t.requests
        with self._tx() as conn:
            # Locks the row (PostgreSQL) so the reaper cannot take it between the check and
            # the writes: a step is never recorded for a request that is no longer ours.
            held = conn.execute(
                select(r.c.id)
                .where(
                    r.c.id == request_id,
                    r.c.claim_token == token,
                    r.c.state == RequestState.PROCESSING.value,
                )
                .with_for_update()
            ).first()
            if held is None:
                return None
            return [self._begin(conn, request_id, step, now) for step in steps]

    @staticmethod
    def _begin(conn: Connection, request_id: int, step: NewStep, now: float) -> int:
        s = t.response_steps
        values = {"state": STARTED, "request": _dump(step.request), "started_at": now}
        if step.id is not None:  # an earlier try of this step, sent again
            conn.execute(
                update(s)
                .where(s.c.id == step.id)
                .values(**values, attempts=s.c.attempts + 1, response=None, completed_at=None)
            )
            return step.id
        res = conn.execute(
            insert(s)
            .values(
                request_id=request_id,
                parent_id=step.parent_id,
                seq=step.seq,
                kind=step.kind,
                name=step.name,
                call_id=step.call_id,
                created_at=now,
                **values,
            )
            .returning(s.c.id)
        )
        return int(res.scalar_one())

    @_on_disconnect_retry
    def end_step(
        self, request_id: int, token: str, step_id: int, state: str, response: Any, now: float
    ) -> bool:
        """Record a started step's end (``completed`` or ``failed``) with its response.
        False when the request is no longer held under ``token`` (nothing written)."""
        s = t.response_steps
        with self._one() as conn:
            res = conn.execute(
                update(s)
                .where(and_(s.c.id == step_id, _held(request_id, token)))
                .values(state=state, response=_dump(response), completed_at=now)
            )
            return res.rowcount == 1
