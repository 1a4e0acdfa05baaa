"""Slot hand-off: a write-back gives the slots it frees to the next pending requests of the
model, started at once by the same worker, in the same statement. SQLite and PostgreSQL."""

from __future__ import annotations

import time

from sqlalchemy import func, select

from fusillade_celery import claimer, schema
from fusillade_celery.cancel_watch import CancelWatch
from fusillade_celery.execute import HandOffPolicy
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.settings import Escalation, Settings
from fusillade_celery.states import IN_FLIGHT, RequestState
from fusillade_celery.store import Finish, HandOff, Store, WorkItem
from fusillade_celery.submit import Client

from .conftest import line
from .test_execute import Recorder, run_message, states

S = RequestState


def in_flight(store: Store, model: str = "m1") -> int:
    r = schema.requests
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    r.c.routed_model == model, r.c.state.in_([s.value for s in IN_FLIGHT])
                )
            ).scalar_one()
        )


def started_rows(store: Store, ids: list[int], token: str) -> list:
    return store.start(ids, token, "w1", time.time())


def test_a_write_back_hands_each_freed_slot_to_one_pending_request(client: Client) -> None:
    """Given two requests in flight (the limit) and more pending, in two batches,
    when they are written back with a hand-off, then as many pending requests start as slots
    were freed: a retry keeps its slot, a stale write frees none, the in-flight count never
    moves, and the second batch reads in progress once one of its requests started."""
    store = client.store
    first = client.submit_batch([line(f"a{i}") for i in range(3)], completion_window="1h")
    second = client.submit_batch([line(f"b{i}") for i in range(3)], completion_window="2h")
    token, claimed = store.claim("m1", "m1", 2, 10, time.time())
    items = started_rows(store, [c.id for c in claimed], token)
    assert in_flight(store) == 2
    to = HandOff("m1", "w9")

    written = store.finish(
        [
            Finish(items[0].id, token, S.COMPLETED, 200, "{}"),
            Finish(items[1].id, token, S.RETRYING, 503, "busy", {"kind": "x"}, time.time() + 60),
        ],
        time.time(),
        to,
    )
    assert written.changed == 2 and len(written.started) == 1  # the retry kept its slot
    handed = written.started[0]
    assert handed.custom_id == "a2" and handed.token != token  # deadline order, fresh token
    row = next(r for r in store.request_rows(first) if r["id"] == handed.id)
    assert (row["state"], row["worker_id"], row["claim_token"]) == (
        "processing",
        "w9",
        handed.token,
    )
    assert in_flight(store) == 2

    # a stale write-back (the token of another claim) frees nothing and starts nothing
    stale = store.finish([Finish(handed.id, token, S.COMPLETED, 200, "{}")], time.time(), to)
    assert (stale.changed, stale.started) == (0, [])

    assert client.get_batch(second)["status"] == "validating"
    written = store.finish(
        [Finish(handed.id, handed.token, S.FAILED, 400, "no", {"kind": "y"})], time.time(), to
    )
    assert [i.custom_id for i in written.started] == ["b0"]
    assert client.get_batch(second)["status"] == "in_progress"
    assert in_flight(store) == 2
    assert states(store, first) == {"a0": "completed", "a1": "retrying", "a2": "failed"}


def test_a_hand_off_leaves_rows_due_for_escalation_to_the_claimer(
    client: Client, settings: Settings
) -> None:
    """Rows whose batch ends before ``deadline_from`` are the claimer's (it routes them to the
    escalation model): a hand-off skips them, and with nothing else pending the slot stays
    free. The policy takes ``deadline_from`` from the model's escalation threshold."""
    store = client.store
    urgent = client.submit_batch([line("u1"), line("u2")], completion_window="30m")
    client.submit_batch([line("r")], completion_window="24h")
    token, claimed = store.claim("m1", "m1", 1, 10, time.time())
    (item,) = started_rows(store, [c.id for c in claimed], token)
    assert item.custom_id == "u1"  # earliest deadline first

    escalating = settings.replace(escalations={"m1": Escalation("m1-fast", 3600)})
    policy = HandOffPolicy(until=time.time() + 60, worker_id="w1")
    now = time.time()
    target = policy.target(escalating, "m1", now, CancelWatch(store, 1.0))
    assert target == HandOff("m1", "w1", deadline_from=now + 3600)
    assert policy.target(settings, "m1", now, CancelWatch(store, 1.0)) == HandOff("m1", "w1")

    def write_back(done: WorkItem) -> list[WorkItem]:
        finish = Finish(done.id, done.token, S.COMPLETED, 200, "{}")
        return store.finish([finish], time.time(), target).started

    handed = write_back(item)
    assert [i.custom_id for i in handed] == ["r"]  # u2 ends within the hour: skipped
    assert write_back(handed[0]) == []
    assert states(store, urgent) == {"u1": "completed", "u2": "pending"}
    assert in_flight(store) == 0


def test_a_message_runs_the_requests_its_freed_slots_start(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """Given a limit of 2 and 7 requests, when one message of the first two runs with a
    hand-off policy, then it runs all 7 without another claim or message, never more than 2
    at once upstream, and the batch is reported for finalizing when its last request ends."""
    limited = settings.replace(model_limits={"m1": 2})
    batch_id = client.submit_batch([line(f"h{i}", mock_latency_ms=50) for i in range(7)])
    rec = Recorder()
    assert claimer.claim_all(client.store, limited, rec.publish) == {"m1": 2}
    (_, token, first), (_, _, second) = rec.messages
    ended: list[set[str]] = []
    report = run_message(
        client.store,
        limited,
        token,
        first + second,
        rec,
        hand_off=HandOffPolicy(until=time.time() + 60, worker_id="w1"),
        requests_ended=lambda models, batches: ended.append(batches),
    )
    assert (report.started, report.handed_off, report.completed) == (2, 5, 7)
    assert set(states(client.store, batch_id).values()) == {"completed"}
    assert mock.state.calls == 7 and mock.state.peak["m1"] <= 2
    assert ended and ended[-1] == {batch_id}


def test_a_handed_off_request_is_retried_under_its_own_token(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    limited = settings.replace(model_limits={"m1": 1})
    batch_id = client.submit_batch([line("a"), line("b", mock_statuses=[503, 200])])
    token, claimed = client.store.claim("m1", "m1", 1, 10, time.time())
    rec = Recorder()
    policy = HandOffPolicy(until=time.time() + 60, worker_id="w1")
    report = run_message(client.store, limited, token, [claimed[0].id], rec, hand_off=policy)
    assert (report.completed, report.handed_off, report.retrying) == (1, 1, 1)
    (retry_ids, _), retry_token = rec.retries[0], rec.retry_tokens[0]
    assert retry_token != token
    assert run_message(client.store, limited, token, retry_ids, rec).started == 0  # fenced
    assert run_message(client.store, limited, retry_token, retry_ids, rec).completed == 1
    assert states(client.store, batch_id) == {"a": "completed", "b": "completed"}


def test_no_hand_off_after_the_window_or_once_stopping(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    limited = settings.replace(model_limits={"m1": 1})
    client.submit_batch([line(f"w{i}") for i in range(3)])
    for policy in (
        HandOffPolicy(until=time.time() - 1, worker_id="w1"),
        HandOffPolicy(until=time.time() + 60, worker_id="w1", active=lambda: False),
    ):
        token, claimed = client.store.claim("m1", "m1", 1, 10, time.time())
        report = run_message(
            client.store, limited, token, [claimed[0].id], Recorder(), hand_off=policy
        )
        assert (report.completed, report.handed_off) == (1, 0)
    assert mock.state.calls == 2
