"""The claim and execute path: claim, start, write back (with the hand-off), and the
checks a worker makes on rows it holds. Every write is fenced on (id, token, state)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Text,
    select,
    update,
)

from .. import schema as t
from .base import (
    _ACTIVE_BATCH,
    Claimed,
    Finish,
    HandOff,
    S,
    StoreBase,
    WorkItem,
    Written,
    _fence_state,
    _ids_bind,
    _lock_key,
    _on_disconnect_retry,
    _p,
    _result_row,
    _work_item,
    new_token,
)
from .statements import (
    _claim_params,
    _claim_statement,
    _held_statement,
    _read_items_statement,
    _sqlite_claim_statements,
    _sqlite_hand_off_statement,
    _sqlite_mark_started_statement,
    _sqlite_write_back_statement,
    _start_statement,
    _write_back_statement,
)


class ClaimStore(StoreBase):
    """Claims, starts and writes back requests (the hot path)."""

    @_on_disconnect_retry
    def active_models(self) -> set[str]:
        """Models of batches that are still running (not cancelling): the claimer's work list."""
        with self._tx() as conn:
            rows = conn.execute(
                select(t.batches.c.models).where(_ACTIVE_BATCH, t.batches.c.cancelling_at.is_(None))
            ).scalars()
            return {m for raw in rows for m in json.loads(raw)}

    @_on_disconnect_retry
    def claim(
        self,
        model: str,
        routed_model: str,
        limit: int,
        batch_size: int,
        now: float,
        deadline_before: float | None = None,
        stop_before_s: float = 0.0,
    ) -> tuple[str, list[Claimed]]:
        """Claim up to ``min(batch_size, limit - in-flight rows of routed_model)`` pending rows
        of ``model``, earliest deadline then line order, of batches whose deadline minus
        ``stop_before_s`` is still ahead. Returns the fresh claim token stamped on them (one
        per claim statement) and the rows. Serialized per routed model by an
        advisory lock on PostgreSQL, so two claimers cannot overshoot the limit.

        On PostgreSQL that is three round trips (there were six): ``BEGIN`` with the lock, one
        statement that counts, picks, claims and marks the batches started, and ``COMMIT``.
        The lock is taken by a statement of its own because a statement sees only the rows
        committed before it began: a count in the lock's statement could miss the claim it
        waited for. Claimers wait for the lock rather than skip (one that gave up would leave
        the slots freed meanwhile idle until the next trigger), so what it is held for, two
        round trips now rather than four, is what other workers' refills queue behind."""
        token = new_token()
        params = _claim_params(
            model, routed_model, token, now, deadline_before, stop_before_s=stop_before_s
        )
        escalating = deadline_before is not None
        if self.is_postgres:
            with self._autocommit.begin() as conn:
                # One simple-protocol round trip; the key is an integer computed here. READ
                # COMMITTED named, not left to the server's default: the count must see what
                # committed before the lock was granted, not before the transaction began.
                conn.exec_driver_sql(
                    "BEGIN ISOLATION LEVEL READ COMMITTED; "
                    f"SELECT pg_advisory_xact_lock({_lock_key(routed_model)})",
                    execution_options={"no_parameters": True},
                )
                rows = conn.execute(
                    _claim_statement(escalating),
                    {**params, "p_limit": limit, "p_batch_size": batch_size},
                )
                claims = [Claimed(i, batch) for i, batch in rows]
        else:
            in_flight, claim_rows = _sqlite_claim_statements(escalating)
            with self._tx() as conn:  # BEGIN IMMEDIATE: SQLite serializes the writers
                n = min(batch_size, limit - conn.execute(in_flight, params).scalar_one())
                if n <= 0:
                    return token, []
                claims = [
                    Claimed(i, batch)
                    for i, batch in conn.execute(claim_rows, {**params, "p_room": n})
                ]
                if claims:
                    marked = {"p_ids": [c.id for c in claims], "p_now": now}
                    conn.execute(_sqlite_mark_started_statement(), marked)
        return token, sorted(claims, key=lambda c: c.id)

    def claim_plan(self, model: str, routed_model: str, limit: int, batch_size: int) -> list[str]:
        """The EXPLAIN of the statement ``claim`` sends (PostgreSQL; nothing is claimed), for
        the benchmark and the test that hold it to index scans."""
        if not self.is_postgres:
            raise NotImplementedError("claim_plan explains the PostgreSQL claim statement")
        params = {
            **_claim_params(model, routed_model, new_token(), time.time()),
            "p_limit": limit,
            "p_batch_size": batch_size,
        }
        compiled = _claim_statement(False).compile(dialect=self.engine.dialect)
        expanded = compiled.construct_expanded_state(params)
        with self._one() as conn:  # EXPLAIN without ANALYZE runs nothing
            rows = conn.exec_driver_sql("EXPLAIN " + expanded.statement, expanded.parameters)
            return [row[0] for row in rows]

    @_on_disconnect_retry
    def start(self, ids: Sequence[int], token: str, worker_id: str, now: float) -> list[WorkItem]:
        """claimed|retrying -> processing for the rows still holding ``token``; returns what
        the attempts need. Rows not returned were reclaimed, cancelled or already done."""
        params = {"p_ids": list(ids), "p_token": token, "p_now": now, "p_worker": worker_id}
        with self._one() as conn:
            rows = conn.execute(_start_statement(self.is_postgres), params)
            if self.is_postgres:
                items = (_work_item(m, token) for m in rows.mappings())
                return sorted(items, key=lambda i: i.id)
            return self._read_items(conn, rows.scalars().all(), token)

    @staticmethod
    def _read_items(conn: Connection, ids: Sequence[int], token: str) -> list[WorkItem]:
        """The attempts' data of rows just started (SQLite, whose RETURNING cannot name the
        joined tables: move, then read)."""
        if not ids:
            return []
        rows = conn.execute(_read_items_statement(), {"p_ids": list(ids)}).mappings()
        return [_work_item(m, token) for m in rows]

    def finish(
        self, results: Sequence[Finish], now: float, hand_off: HandOff | None = None
    ) -> Written:
        """Write back attempts, each fenced on (id, its token, state=processing), in one
        statement whatever their target states.

        With ``hand_off``, the same statement gives every slot it frees (a row written
        completed or failed; a retry keeps its slot) to the next pending request of the
        hand-off's model, claimed straight into ``processing`` for the hand-off's worker under
        a fresh token, and returns those requests for the worker to send at once. Rows leave
        and enter the in-flight count in one atomic statement, so the model's limit holds
        without the claim lock: any concurrent claim counts both or neither. Why: a freed
        slot otherwise travels write-back, refill claim, broker, start statement and only
        then reaches the upstream, which at 1,000 in flight kept each slot idle for about
        130 ms of every 1 s call (benchmark "latency").

        The statement may have committed before its reply was lost (a dropped connection,
        retried here, or an unreachable database, retried by the caller with the same
        ``hand_off.token``): run again, it writes nothing (fenced) and hands off nothing, so
        when a write changed fewer rows than given, the rows started under the token are
        looked up: they are this worker's to run (nobody else holds it), with their
        processing clock restarted (the outage may have used it up)."""
        if not results:
            return Written(0, [])
        rows = [_result_row(f) for f in results]
        params: dict[str, Any] = {"p_now": now}
        if hand_off is not None:
            params.update(
                _claim_params(
                    hand_off.model,
                    hand_off.model,
                    hand_off.token or new_token(),
                    now,
                    worker=hand_off.worker_id,
                    stop_before_s=hand_off.stop_before_s,
                )
            )
        runs: list[int] = []
        written = self._write_back(rows, params, hand_off is not None, runs)
        if hand_off is None or (len(runs) == 1 and written.changed >= len(rows)):
            return written
        started = {i.id: i for i in written.started}
        earlier = [i for i in self.held(params["p_token"]) if i.id not in started]
        if earlier:
            self.touch_started([(i.id, i.token) for i in earlier], time.time())
            started.update((i.id, i) for i in earlier)
        return Written(written.changed, sorted(started.values(), key=lambda i: i.id))

    @_on_disconnect_retry
    def _write_back(
        self, rows: list[dict[str, Any]], params: dict[str, Any], hand_off: bool, runs: list[int]
    ) -> Written:
        runs.append(1)  # how many times the transaction ran (``finish``)
        if not self.is_postgres:
            with self._tx() as conn:
                return self._write_back_rows(conn, rows, params, hand_off)
        params = {**params, "p_rows": json.dumps(rows), "p_ids": [row["id"] for row in rows]}
        with self._one() as conn:
            if not hand_off:
                res = conn.execute(_write_back_statement(False), params)
                return Written(max(res.rowcount, 0), [])
            out = conn.execute(_write_back_statement(True), params).mappings().all()
        items = (_work_item(m, params["p_token"]) for m in out if m["id"] is not None)
        return Written(int(out[0]["changed"]), sorted(items, key=lambda i: i.id))

    @_on_disconnect_retry
    def holding(self, results: Sequence[Finish]) -> list[Finish]:
        """The results whose row holds what they wrote (their token and state): after a
        write-back that changed fewer rows than it was given, which of them were written.
        The others were stale (reaped, cancelled or expired meanwhile); counting them as done,
        or scheduling their retries, would misreport the message. Off the hot path: a
        write-back changes every row it is given unless one was taken from it."""
        r = t.requests
        with self._one() as conn:
            rows = conn.execute(
                select(r.c.id, r.c.claim_token, r.c.state).where(
                    r.c.id.in_([f.id for f in results])
                )
            ).all()
        now_held = {(i, token, state) for i, token, state in rows}
        return [f for f in results if (f.id, f.token, f.state.value) in now_held]

    @_on_disconnect_retry
    def held(self, token: str) -> list[WorkItem]:
        """The rows processing under ``token``, with what their attempts need: the requests
        a hand-off under that token started (``finish``)."""
        with self._one() as conn:
            rows = conn.execute(_held_statement(), {"p_token": token}).mappings()
            return [_work_item(m, token) for m in rows]

    def _write_back_rows(
        self,
        conn: Connection,
        rows: list[dict[str, Any]],
        params: dict[str, Any],
        hand_off: bool,
    ) -> Written:
        """SQLite: an executemany for the rows that end and one for the retries, then the
        hand-off, all in the caller's transaction (SQLite serializes writers, so nothing
        claims in between)."""
        changed = freed = 0
        for ending in (True, False):
            group = [row for row in rows if (row["state"] != S.RETRYING.value) is ending]
            if group:
                many = [
                    {"p_now": params["p_now"], **{"b_" + k: v for k, v in row.items()}}
                    for row in group
                ]
                n = max(conn.execute(_sqlite_write_back_statement(), many).rowcount, 0)
                changed += n
                freed += n if ending else 0
        if not hand_off or freed == 0:
            return Written(changed, [])
        claimed = conn.execute(_sqlite_hand_off_statement(), {**params, "p_room": freed})
        ids = [i for i, _ in claimed]
        if ids:
            marked = {"p_ids": list(ids), "p_now": params["p_now"]}
            conn.execute(_sqlite_mark_started_statement(), marked)
        return Written(changed, self._read_items(conn, ids, params["p_token"]))

    @_on_disconnect_retry
    def still_held(self, request_id: int, token: str) -> bool:
        """Whether the row is still processing under ``token`` (not reaped, cancelled or
        ended meanwhile); asked before a call only when this worker may have been taken for
        dead (``CancelWatch._lost``)."""
        r = t.requests
        with self._one() as conn:
            return (
                conn.execute(
                    select(r.c.id).where(
                        r.c.id == request_id,
                        r.c.claim_token == token,
                        _fence_state(S.PROCESSING),
                    )
                ).first()
                is not None
            )

    @_on_disconnect_retry
    def touch_started(self, held: Iterable[tuple[int, str]], now: float) -> int:
        """Restart the processing clock of rows this worker holds and has not sent yet:
        ``started_at`` is stamped when a message starts its rows, and a row that then waited
        behind the worker's other calls longer than the processing timeout was reaped while
        alive and sent twice. Fenced on each row's token and ``processing``. Off the hot
        path: only rows that waited a quarter of the processing timeout are touched (by the
        cancel watcher), and those a lost reply left (``finish``)."""
        by_token: dict[str, list[int]] = {}
        for request_id, token in held:
            by_token.setdefault(token, []).append(request_id)
        if not by_token:
            return 0
        r = t.requests
        changed = 0
        touch = (
            update(r)
            .where(_ids_bind(self.is_postgres), r.c.claim_token == _p("token", Text))
            .where(_fence_state(S.PROCESSING))  # primary-key probes, not the in-flight index
            .values(started_at=now)
        )
        for token, ids in by_token.items():
            # A statement each, each atomic by itself: one transaction holding these rows'
            # locks across statements could deadlock against a cancel or an expiry.
            with self._one() as conn:
                res = conn.execute(touch, {"p_ids": ids, "p_token": token})
                changed += max(res.rowcount, 0)
        return changed
