"""Slot hand-off: a write-back gives the slots it frees to the next pending requests of the
model, started at once by the same worker, in the same statement. SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError

from fusillade_celery import claimer, schema
from fusillade_celery.cancel_watch import CancelWatch
from fusillade_celery.execute import HandOffPolicy, execute
from fusillade_celery.live import LiveConfig
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.settings import Escalation, Settings
from fusillade_celery.states import IN_FLIGHT, RequestState
from fusillade_celery.store import Finish, HandOff, Store, StoredConfig
from fusillade_celery.submit import Client
from fusillade_celery.upstream import get_session

from .conftest import line
from .services import wait_for
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


def test_no_hand_off_for_models_in_an_sla_escalation(client: Client, settings: Settings) -> None:
    """Which rows are urgent and whose slots they take is the claimer's decision: a model
    with an escalation, and the escalation model itself, never hand slots on."""
    escalating = settings.replace(escalations={"m1": Escalation("m1-fast", 3600)})
    policy = HandOffPolicy(until=time.time() + 60, worker_id="w1")
    watch = CancelWatch(client.store, 1.0)
    now = time.time()
    assert policy.target(LiveConfig(escalating), escalating, "m1", now, watch) is None
    assert policy.target(LiveConfig(escalating), escalating, "m1-fast", now, watch) is None
    for model, s in (("m2", escalating), ("m1", settings)):
        target = policy.target(LiveConfig(s), s, model, now, watch)
        assert target is not None and (target.model, target.worker_id) == (model, "w1")


def test_a_lowered_limit_stops_the_hand_offs_of_messages_begun_under_the_old_one(
    client: Client, settings: Settings
) -> None:
    """A hand-off replaces a slot one for one, so the in-flight count drains to a lowered
    limit only if messages begun under the old limit stop handing off; messages begun under
    the new one (claimed within it) go on; a paused model (0) hands nothing on."""
    watch = CancelWatch(client.store, 1.0)
    now = time.time()
    old = LiveConfig(settings, StoredConfig({"m1": 8}, {}))
    lowered = LiveConfig(settings, StoredConfig({"m1": 2}, {}))
    begun_before = HandOffPolicy(until=now + 60, worker_id="w1", started_with=old)
    begun_after = HandOffPolicy(until=now + 60, worker_id="w1", started_with=lowered)
    assert begun_before.target(old, settings, "m1", now, watch) is not None
    assert begun_before.target(lowered, settings, "m1", now, watch) is None
    assert begun_before.target(lowered, settings, "m2", now, watch) is not None
    assert begun_after.target(lowered, settings, "m1", now, watch) is not None
    paused = LiveConfig(settings, StoredConfig({"m1": 0}, {}))
    assert begun_after.target(paused, settings, "m1", now, watch) is None


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


def test_a_row_reaped_while_running_and_handed_back_to_its_message_ends_once(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """Given a message whose slow request is reaped while its call still runs (as after a
    processing timeout), when a faster request of the message ends and hands its slot on,
    then the reaped row may come back to this very message under a new token: both attempts
    run, the stale one's result is fenced out, and the row ends completed once."""
    limited = settings.replace(model_limits={"m1": 2}, timeout_ms=5000)
    store = client.store
    batch_id = client.submit_batch(
        [line("x0", mock_latency_ms=1500), line("x1", mock_latency_ms=300), line("x2")]
    )
    rec = Recorder()
    claimer.claim_all(store, limited, rec.publish)
    (_, token, first), (_, _, second) = rec.messages
    reaped: list[int] = []

    def reap_x0() -> None:
        wait_for(lambda: {"x0", "x1"} <= {e["custom_id"] for e in mock.state.log}, 5, what="calls")
        with store.engine.begin() as conn:  # x0 as if past processing_timeout
            r = schema.requests
            conn.execute(update(r).where(r.c.id == first[0]).values(started_at=0.0))
        reaped.append(store.reap(time.time(), 60, 600))

    reaper = threading.Thread(target=reap_x0)
    reaper.start()
    report = run_message(
        store,
        limited,
        token,
        first + second,
        rec,
        hand_off=HandOffPolicy(until=time.time() + 60, worker_id="w1"),
    )
    reaper.join(10)
    assert reaped == [1]
    calls = [e["custom_id"] for e in mock.state.log]
    assert sorted(calls) == ["x0", "x0", "x1", "x2"]  # x0 handed back and sent again
    assert states(store, batch_id) == {"x0": "completed", "x1": "completed", "x2": "completed"}
    # The stale attempt's write changed nothing, and the report says so.
    assert (report.completed, report.stale) == (3, 1)
    assert in_flight(store) == 0


def test_a_reply_lost_after_commit_still_returns_the_started_rows(pg_url: str) -> None:
    """Given a write-back with hand-off whose statement committed but whose reply was lost
    (the connection dropped), when it is run again on a new connection (fenced: it writes
    and starts nothing), then the rows the first run started are still returned to the
    worker to send, instead of sitting in processing under a token nobody holds."""
    client = Client(Settings().replace(database_url=pg_url, upstream_url="http://up"))
    store = client.store
    batch_id = client.submit_batch([line("a"), line("b")])
    token, claimed = store.claim("m1", "m1", 1, 10, time.time())
    (item,) = store.start([claimed[0].id], token, "w1", time.time())
    real_one, runs = store._one, []

    @contextmanager
    def drops_after_the_first_commit() -> Iterator[Any]:
        with real_one() as conn:
            runs.append(1)
            if len(runs) > 1:
                yield conn
                return

            class Dropped:
                def execute(self, *args: Any, **kwargs: Any) -> None:
                    conn.execute(*args, **kwargs)  # runs and commits (autocommit)
                    raise DBAPIError(
                        "stmt", {}, Exception("server closed"), connection_invalidated=True
                    )

            yield Dropped()

    store._one = drops_after_the_first_commit  # type: ignore[method-assign]
    written = store.finish(
        [Finish(item.id, token, S.COMPLETED, 200, "{}")], time.time(), HandOff("m1", "w1")
    )
    assert len(runs) >= 2
    assert [i.custom_id for i in written.started] == ["b"]
    row = {r["custom_id"]: r for r in store.request_rows(batch_id)}["b"]
    assert (row["state"], row["claim_token"]) == ("processing", written.started[0].token)


def test_a_broker_failure_when_scheduling_a_retry_strands_nothing(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """Given a retry whose countdown message cannot be published (the broker is away), the
    requests the same write-back started still run, and the retried row waits in
    ``retrying`` for the reaper (which takes overdue retries back to pending)."""
    limited = settings.replace(model_limits={"m1": 2})
    batch_id = client.submit_batch(
        [line("a", mock_statuses=[503, 200]), line("b"), line("c"), line("d")]
    )
    token, claimed = client.store.claim("m1", "m1", 2, 10, time.time())

    def broker_away(token: str, ids: list[int], delay: float) -> None:
        raise ConnectionError("redis: connection refused")

    report = execute(
        client.store,
        limited,
        get_session(),
        token,
        [c.id for c in claimed],
        "w1",
        broker_away,
        hand_off=HandOffPolicy(until=time.time() + 60, worker_id="w1"),
    )
    assert report.retrying == 1
    got = states(client.store, batch_id)
    assert got == {"a": "retrying", "b": "completed", "c": "completed", "d": "completed"}
    assert mock.state.calls == 4


def test_a_cancel_holding_the_batch_row_does_not_block_a_hand_off(pg_url: str) -> None:
    """Given a cancel that has locked a batch row and not yet its requests, when a write-back
    hands a slot to that batch's first request, then it neither waits for the cancel nor
    deadlocks with it (it used to: requests then batch, against batch then requests); the
    cancel then finishes and the batch's requests end canceled."""
    client = Client(Settings().replace(database_url=pg_url, upstream_url="http://up"))
    store = client.store
    client.submit_batch([line("x0")], completion_window="1h")
    later = client.submit_batch([line("y0"), line("y1")], completion_window="24h")
    token, claimed = store.claim("m1", "m1", 1, 10, time.time())
    (item,) = store.start([claimed[0].id], token, "w1", time.time())
    with store.engine.connect() as cancel:
        b = schema.batches
        cancel.execute(update(b).where(b.c.id == later).values(cancelling_at=time.time()))
        out: list[Any] = []
        writer = threading.Thread(
            target=lambda: out.append(
                store.finish(
                    [Finish(item.id, token, S.COMPLETED, 200, "{}")],
                    time.time(),
                    HandOff("m1", "w1"),
                )
            )
        )
        writer.start()
        writer.join(10)
        assert not writer.is_alive(), "the hand-off waited for the cancel's lock"
        assert [i.custom_id for i in out[0].started] == ["y0"]
        cancel.commit()
    store.cancel_batch(later, time.time())
    assert set(states(store, later).values()) == {"canceled"}
