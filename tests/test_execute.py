"""Claim and execute as plain functions against a real database and the real mock upstream:
fencing, outcomes, retries, limits, cancel, finalize and expiry. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
from sqlalchemy import text

from fusillade_celery import claimer, maintenance
from fusillade_celery.cancel_watch import CancelWatch
from fusillade_celery.execute import Report, execute
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.settings import Settings
from fusillade_celery.store import Store
from fusillade_celery.submit import Client
from fusillade_celery.upstream import get_session

from .conftest import line
from .services import wait_for


class Recorder:
    """Stands in for the broker: collects what the claimer and the task would publish."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, list[int]]] = []
        self.retries: list[tuple[list[int], float]] = []
        self.retry_tokens: list[str] = []
        #: The batch ids each published message and each retry would carry (for Flower).
        self.message_batches: list[list[str]] = []
        self.retry_batches: list[list[str]] = []

    def publish(self, routed: str, token: str, ids: list[int], batch_ids: list[str]) -> None:
        batch_of = dict(zip(ids, batch_ids, strict=True))
        for chunk in claimer.split(ids, 1):  # one request per message
            self.messages.append((routed, token, chunk))
            self.message_batches.append(sorted({batch_of[i] for i in chunk}))

    def schedule_retry(self, token: str, ids: list[int], delay: float, batches: list[str]) -> None:
        self.retries.append((ids, delay))
        self.retry_tokens.append(token)
        self.retry_batches.append(batches)


def run_message(
    store: Store, settings: Settings, token: str, ids: list[int], rec: Recorder, **kwargs: Any
) -> Report:
    """One execute message as the task runs it: this process's session, worker "w1"."""
    return execute(store, settings, get_session(), token, ids, "w1", rec.schedule_retry, **kwargs)


def run_claimed(store: Store, settings: Settings, rec: Recorder) -> list:
    reports = []
    while rec.messages:
        _, token, ids = rec.messages.pop(0)
        reports.append(run_message(store, settings, token, ids, rec))
    return reports


def states(store: Store, batch_id: str) -> dict[str, str]:
    return {r["custom_id"]: r["state"] for r in store.request_rows(batch_id)}


def test_completes_and_sends_the_headers(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    batch_id = client.submit_batch([line("a"), line("b")], metadata={"x": "y"})
    rec = Recorder()
    assert claimer.claim_all(client.store, settings, rec.publish) == {"m1": 2}
    run_claimed(client.store, settings, rec)
    assert states(client.store, batch_id) == {"a": "completed", "b": "completed"}
    batch = client.get_batch(batch_id)
    headers = mock.state.log[0]["headers"]
    assert headers["authorization"] == "Bearer sk-test-secret-123"
    rows = client.store.request_rows(batch_id)
    assert headers["x-fusillade-request-id"] == str(rows[0]["id"])
    assert headers["x-fusillade-custom-id"] == "a"
    assert headers["x-fusillade-batch-id"] == batch_id
    assert headers["x-fusillade-batch-endpoint"] == "/v1/chat/completions"
    assert headers["x-fusillade-batch-completion-window"] == "24h"
    assert headers["x-fusillade-batch-created-at"] == str(batch["created_at"])
    out = list(client.iter_results(batch_id))
    assert [o["custom_id"] for o in out] == ["a", "b"]
    assert out[0]["response"]["body"]["choices"][0]["message"]["content"] == "reply to a (call 1)"


def test_no_authorization_header_when_the_key_is_empty(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    client.submit_batch([line("a")], upstream=mock.url)  # batch-level upstream, no key
    rec = Recorder()
    claimer.claim_all(client.store, settings, rec.publish)
    run_claimed(client.store, settings, rec)
    assert "authorization" not in mock.state.log[0]["headers"]


def test_stale_and_duplicate_messages_change_nothing(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    batch_id = client.submit_batch([line("a")])
    rec = Recorder()
    claimer.claim_all(client.store, settings, rec.publish)
    _, token, ids = rec.messages[0]
    # a message with a wrong token: nothing starts, no upstream call
    report = run_message(client.store, settings, "not-the-token", ids, rec)
    assert (report.started, report.stale, mock.state.calls) == (0, 1, 0)
    # the real one completes; a duplicate delivery of it afterwards does nothing
    run_message(client.store, settings, token, ids, rec)
    before = client.store.request_rows(batch_id)[0]
    report = run_message(client.store, settings, token, ids, rec)
    assert report.started == 0 and mock.state.calls == 1
    assert client.store.request_rows(batch_id)[0] == before
    # a late write-back of the old attempt cannot overwrite the terminal row
    from fusillade_celery.states import RequestState
    from fusillade_celery.store import Finish

    assert (
        client.store.finish(
            [Finish(ids[0], token, RequestState.FAILED, 500, "late")], time.time()
        ).changed
        == 0
    )
    assert client.store.request_rows(batch_id)[0]["state"] == "completed"


def test_a_result_whose_row_was_taken_meanwhile_is_reported_stale_not_done(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """A row reaped (or cancelled, or expired) while its attempt runs refuses that attempt's
    write-back. The message's report, which the worker logs and Flower shows, counts it as
    stale rather than as done, and no retry goes out for a row that is not retrying."""
    kept = client.submit_batch([line("kept")])
    taken = client.submit_batch([line("taken", mock_stall_ms=1500, mock_statuses=[503])])
    rec = Recorder()
    claimer.claim_all(client.store, settings, rec.publish)
    token = rec.messages[0][1]
    ids = [i for _, _, chunk in rec.messages for i in chunk]
    reports: list[Report] = []
    worker = threading.Thread(
        target=lambda: reports.append(run_message(client.store, settings, token, ids, rec))
    )
    worker.start()
    wait_for(lambda: mock.state.by_custom_id.get("taken") == 1, 10, what="the stalled call")
    assert client.store.requeue_in_flight(taken) == 1  # as the reaper would
    worker.join(10)
    report = reports[0]
    assert (report.completed, report.retrying, report.stale) == (1, 0, 1)
    assert rec.retries == []
    assert states(client.store, kept) == {"kept": "completed"}
    assert states(client.store, taken) == {"taken": "pending"}


def test_outcomes_are_classified(client: Client, settings: Settings, mock: MockUpstream) -> None:
    batch_id = client.submit_batch(
        [
            line("ok"),
            line("bad", mock_statuses=[400]),
            line("busy", mock_statuses=[503, 200]),
            line("reset", mock_reset=1),
            line("slow", mock_stall_ms=4000),
        ]
    )
    rec = Recorder()
    claimer.claim_all(client.store, settings, rec.publish)
    run_claimed(client.store, settings, rec)
    rows = {r["custom_id"]: r for r in client.store.request_rows(batch_id)}
    assert rows["ok"]["state"] == "completed"
    assert rows["bad"]["state"] == "failed"
    assert json.loads(rows["bad"]["error"])["kind"] == "non_retriable_http_status"
    for cid, kind in (
        ("busy", "retriable_http_status"),
        ("reset", "network_error"),
        ("slow", "timeout"),
    ):
        assert rows[cid]["state"] == "retrying", cid
        assert json.loads(rows[cid]["error"])["kind"] == kind
        assert rows[cid]["attempt"] == 1
    retried = sorted(i for ids, _ in rec.retries for i in ids)
    assert retried == sorted(rows[c]["id"] for c in ("busy", "reset", "slow"))
    assert all(delay == pytest.approx(0.05, abs=0.02) for _, delay in rec.retries)


def test_retry_is_denied_at_the_deadline(client: Client, settings: Settings) -> None:
    batch_id = client.submit_batch([line("a", mock_statuses=[503])], completion_window="1s")
    slow = settings.replace(backoff_ms=2000, max_backoff_ms=2000)
    rec = Recorder()
    claimer.claim_all(client.store, slow, rec.publish)
    run_claimed(client.store, slow, rec)
    row = client.store.request_rows(batch_id)[0]
    assert row["state"] == "failed" and not rec.retries
    error = json.loads(row["error"])
    assert error["kind"] == "retriable_http_status" and error["retries_exhausted"]


def test_claim_respects_the_limit_and_the_deadline_order(
    client: Client, settings: Settings
) -> None:
    limited = settings.replace(model_limits={"m1": 3})
    late = client.submit_batch([line(f"late{i}") for i in range(3)], completion_window="2h")
    early = client.submit_batch([line(f"early{i}") for i in range(3)], completion_window="1h")
    rec = Recorder()
    assert claimer.claim_all(client.store, limited, rec.publish) == {"m1": 3}
    assert claimer.claim_all(client.store, limited, rec.publish) == {"m1": 0}  # no capacity
    assert set(states(client.store, early).values()) == {"claimed"}
    assert set(states(client.store, late).values()) == {"pending"}
    assert client.get_batch(early)["status"] == "in_progress"
    assert client.get_batch(late)["status"] == "validating"
    run_claimed(client.store, limited, rec)
    assert claimer.claim_all(client.store, limited, rec.publish) == {"m1": 3}
    tokens = {t for _, t, _ in rec.messages}
    assert len(tokens) == 1  # one fresh token per claim statement


def test_the_claim_never_scans_the_requests_table(pg_url: str) -> None:
    """A claim is an index walk however many rows are pending. When its room (the limit minus
    what is in flight) was only known inside the statement, the planner guessed 10 % of the
    table and scanned all of it: 200 ms a claim at a million pending rows instead of 16.
    20,000 rows are enough for that plan to be chosen."""
    settings = Settings().replace(database_url=pg_url, broker_url="", upstream_url="http://up")
    client = Client(settings)
    client.submit_batch([line(f"r{i}") for i in range(20_000)])
    with client.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE requests"))  # what autovacuum would do after the submit
    _, claimed = client.store.claim("m1", "m1", 1000, 1000, time.time())
    assert len(claimed) == 1000
    plan = "\n".join(client.store.claim_plan("m1", "m1", 1000, 1000))
    assert "ix_requests_pending" in plan, plan
    assert "Seq Scan on requests" not in plan, plan


def test_escalation_routes_urgent_rows_to_the_escalation_model(
    client: Client, settings: Settings
) -> None:
    from fusillade_celery.settings import Escalation

    esc = settings.replace(escalations={"m1": Escalation("m1-fast", 3600)})
    urgent = client.submit_batch([line("u")], completion_window="30m")
    relaxed = client.submit_batch([line("r")], completion_window="24h")
    rec = Recorder()
    claimer.claim_all(client.store, esc, rec.publish)
    routed = {
        client.store.request_rows(b)[0]["custom_id"]: client.store.request_rows(b)[0][
            "routed_model"
        ]
        for b in (urgent, relaxed)
    }
    assert routed == {"u": "m1-fast", "r": "m1"}
    assert sorted(r for r, _, _ in rec.messages) == ["m1", "m1-fast"]


def test_an_escalated_request_names_the_escalation_model_upstream(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """The escalation upstream receives the escalation model in the body (as fusillade
    sends it), the output holds what it answered, and a retry stays escalated."""
    from fusillade_celery.settings import Escalation

    esc = settings.replace(escalations={"m1": Escalation("m1-fast", 7200)})
    batch_id = client.submit_batch(
        [line("u", mock_statuses=[503, 200], temperature=0.5)], completion_window="1h"
    )
    rec = Recorder()
    claimer.claim_all(client.store, esc, rec.publish)
    run_claimed(client.store, esc, rec)
    assert rec.retries and states(client.store, batch_id) == {"u": "retrying"}
    row = client.store.request_rows(batch_id)[0]
    wait_for(lambda: time.time() >= row["not_before"], 5, what="the retry to be due")
    run_message(client.store, esc, row["claim_token"], [row["id"]], rec)
    assert [(e["model"], e["status"]) for e in mock.state.log] == [
        ("m1-fast", 503),
        ("m1-fast", 200),
    ]
    (out,) = list(client.iter_results(batch_id))
    assert out["response"]["body"]["model"] == "m1-fast"
    assert client.store.request_rows(batch_id)[0]["routed_model"] == "m1-fast"
    # a batch with its own upstream keeps its model names there, escalated or not
    own = client.submit_batch([line("own")], completion_window="1h", upstream=mock.url)
    claimer.claim_all(client.store, esc, rec.publish)
    run_claimed(client.store, esc, rec)
    assert client.store.request_rows(own)[0]["routed_model"] == "m1-fast"
    assert mock.state.log[-1]["model"] == "m1"


def test_finalize_walks_the_statuses(client: Client, settings: Settings) -> None:
    batch_id = client.submit_batch([line("a"), line("b", mock_statuses=[400])])
    rec = Recorder()
    claimer.claim_all(client.store, settings, rec.publish)
    run_claimed(client.store, settings, rec)
    assert client.get_batch(batch_id)["status"] == "in_progress"
    maintenance.finalize(client.store, settings)
    batch = client.get_batch(batch_id)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert batch["in_progress_at"] <= batch["finalizing_at"] <= batch["completed_at"]
    out = list(client.iter_file(batch["output_file_id"]))
    err = list(client.iter_file(batch["error_file_id"]))
    assert [o["custom_id"] for o in out] == ["a"] and [e["custom_id"] for e in err] == ["b"]


def test_all_failed_batch_reads_failed(client: Client, settings: Settings) -> None:
    batch_id = client.submit_batch([line("b", mock_statuses=[400])])
    rec = Recorder()
    claimer.claim_all(client.store, settings, rec.publish)
    run_claimed(client.store, settings, rec)
    maintenance.finalize(client.store, settings)
    assert client.get_batch(batch_id)["status"] == "failed"


def test_expiry_keeps_finished_results_and_fails_the_rest(
    client: Client, settings: Settings
) -> None:
    batch_id = client.submit_batch([line("done"), line("late")], completion_window="1s")
    rec = Recorder()
    client.store.claim("m1", "m1", limit=1, batch_size=1, now=time.time())  # "done" in flight...
    token, claimed = client.store.claim("m1", "m1", limit=10, batch_size=1, now=time.time())
    rows = client.store.request_rows(batch_id)
    first_token = rows[0]["claim_token"]
    run_message(client.store, settings, first_token, [rows[0]["id"]], rec)
    maintenance.finalize(client.store, settings, now=time.time() + 2)
    batch = client.get_batch(batch_id)
    assert batch["status"] == "expired"
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    errors = list(client.iter_results(batch_id, errors=True))
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("late", "batch_expired")]
    # the in-flight attempt of "late" finishing now cannot overwrite the expiry
    report = run_message(client.store, settings, token, [c.id for c in claimed], rec)
    assert report.started == 0


def test_a_batch_finished_before_its_deadline_reads_completed_when_finalized_late(
    client: Client, settings: Settings
) -> None:
    """Every request ended in time, but no finalize pass ran before the deadline (beat down,
    its tick queued behind busy workers): the batch is completed, not expired."""
    batch_id = client.submit_batch([line("a"), line("b")], completion_window="1s")
    rec = Recorder()
    claimer.claim_all(client.store, settings, rec.publish)
    run_claimed(client.store, settings, rec)
    result = maintenance.finalize(client.store, settings, now=time.time() + 5)
    assert result["expired"] == []
    assert client.get_batch(batch_id)["status"] == "completed"


def test_an_expired_batch_is_aborted_like_a_cancelled_one(
    client: Client, settings: Settings
) -> None:
    """Expiry fails a batch's in-flight rows, which frees their slots for other batches at
    once; the abort poll then stops their calls too, so the upstream never sees more than the
    model's limit."""
    batch_id = client.submit_batch([line("slow")], completion_window="1s")
    client.store.claim("m1", "m1", limit=10, batch_size=10, now=time.time())
    assert client.store.cancelled_among([batch_id]) == set()
    maintenance.finalize(client.store, settings, now=time.time() + 2)
    assert client.get_batch(batch_id)["status"] == "expired"
    assert client.store.cancelled_among([batch_id]) == {batch_id}


def test_cancel_stops_new_sends(client: Client, settings: Settings, mock: MockUpstream) -> None:
    batch_id = client.submit_batch([line(f"r{i}") for i in range(4)])
    rec = Recorder()
    client.store.claim("m1", "m1", limit=2, batch_size=2, now=time.time())
    claimer.claim_all(client.store, settings.replace(model_limits={"m1": 2}), rec.publish)
    rows = client.store.request_rows(batch_id)
    claimed = [(r["claim_token"], r["id"]) for r in rows if r["state"] == "claimed"]
    assert client.cancel_batch(batch_id)["status"] == "cancelling"
    for token, rid in claimed:  # messages already queued
        run_message(client.store, settings, token, [rid], rec)
    assert mock.state.calls == 0
    assert set(states(client.store, batch_id).values()) == {"canceled"}
    assert claimer.claim_all(client.store, settings, rec.publish) == {}
    maintenance.finalize(client.store, settings)
    assert client.get_batch(batch_id)["status"] == "cancelled"


def test_reaper_returns_orphans_with_a_new_token(client: Client, settings: Settings) -> None:
    batch_id = client.submit_batch([line("a")])
    token, claimed = client.store.claim("m1", "m1", limit=5, batch_size=5, now=time.time() - 120)
    assert maintenance.reap(client.store, settings) == 1
    row = client.store.request_rows(batch_id)[0]
    assert row["state"] == "pending" and row["claim_token"] is None and row["attempt"] == 0
    token2, _ = client.store.claim("m1", "m1", limit=5, batch_size=5, now=time.time())
    assert token2 != token
    rec = Recorder()
    assert run_message(client.store, settings, token, [claimed[0].id], rec).started == 0


def test_a_worker_restarted_with_the_same_host_and_pid_does_not_hide_its_dead_predecessor(
    client: Client, settings: Settings
) -> None:
    """A container restarted after a crash keeps its hostname and often its pid (1). The new
    process's heartbeat must not stand for the old one: the crashed worker's requests go back
    to pending once its last heartbeat is older than the stale threshold, not only after the
    processing timeout."""
    from fusillade_celery import workers

    client.submit_batch([line("a"), line("b")])
    t0 = time.time()
    crashed = workers.worker_id()
    client.store.heartbeat(crashed, "host", 1, "model.m1", t0)
    token, rows = client.store.claim("m1", "m1", limit=5, batch_size=5, now=t0)
    assert len(client.store.start([r.id for r in rows], token, crashed, t0)) == 2
    workers._IDS.clear()  # what a new interpreter with the same pid starts from
    restarted = workers.worker_id()
    assert restarted != crashed
    client.store.heartbeat(restarted, "host", 1, "model.m1", t0 + 10)
    assert client.store.reap(t0 + 40, 60, 600, stale_worker_s=30) == 2


def test_a_batch_is_finalized_right_after_its_last_write_back(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """The worker is told which batches just had requests end; finalizing those closes a
    finished batch at once (not at beat's next tick), once, and leaves running ones alone."""
    done_id = client.submit_batch([line("a"), line("b")])
    running_id = client.submit_batch([line("c", model="m2")])
    rec = Recorder()
    claimer.claim_model(client.store, settings, rec.publish, "m1")
    ended: list[tuple[set[str], set[str]]] = []
    for _, token, ids in rec.messages:
        run_message(
            client.store,
            settings,
            token,
            ids,
            rec,
            requests_ended=lambda models, batches: ended.append((models, batches)),
        )
    assert ended and all(e == ({"m1"}, {done_id}) for e in ended)
    assert maintenance.finalize_now(client.store, [done_id, running_id]) == [done_id]
    first = client.get_batch(done_id)
    assert first["status"] == "completed"
    assert first["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    # a second finalizer (beat's tick, another worker) finds nothing left to close
    assert maintenance.finalize_now(client.store, [done_id]) == []
    assert maintenance.finalize(client.store, settings)["finalized"] == []
    assert client.get_batch(done_id)["completed_at"] == first["completed_at"]
    assert client.get_batch(running_id)["status"] in ("validating", "in_progress")


@pytest.mark.parametrize("concurrency", [3, 8])
def test_without_gevent_a_message_runs_its_attempts_concurrently_within_c(
    client: Client, settings: Settings, mock: MockUpstream, concurrency: int
) -> None:
    """Threads pool / embedded mode: a message of 8 slow requests runs as many at once as the
    process's -c allows (not one after the other, not more)."""
    batch_id = client.submit_batch([line(f"t{i}", mock_latency_ms=300) for i in range(8)])
    token, rows = client.store.claim("m1", "m1", 100, 100, time.time())
    watch = CancelWatch(client.store, poll_s=1.0, concurrency=concurrency)
    report = run_message(
        client.store, settings, token, [r.id for r in rows], Recorder(), watch=watch
    )
    assert report.completed == 8
    assert mock.state.peak["m1"] == concurrency
    assert set(states(client.store, batch_id).values()) == {"completed"}


def test_attempts_sent_together_are_written_back_as_soon_as_the_last_is_in(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk of results (one write-back) closes once every attempt added with its results
    has finished: an attempt added later and still running neither holds the write-back for
    the linger nor joins it (here it ends 1 s later, well inside a 10 s linger)."""
    from fusillade_celery.cancel_watch import Attempts

    monkeypatch.setattr(Attempts, "LINGER_S", 10.0)
    watch = CancelWatch(client.store, poll_s=60.0, concurrency=4)
    late = threading.Event()
    timer = threading.Timer(1.0, late.set)
    timer.start()
    chunks = []
    with watch.attempts(flush_s=20.0) as attempts:
        attempts.add([(f"a{i}", "batch", lambda i=i: i) for i in range(3)])
        attempts.add([("late", "batch", lambda: "late" if late.wait(5) else "timed out")])
        for chunk in attempts:
            chunks.append(sorted((str(key), value) for key, value, _ in chunk))
            late.set()
    timer.cancel()
    assert chunks == [[("a0", 0), ("a1", 1), ("a2", 2)], [("late", "late")]]


@pytest.mark.parametrize("earlier_poll", ["none", "died"])
def test_without_gevent_queued_attempts_of_a_cancelled_batch_never_reach_the_upstream(
    client: Client, settings: Settings, mock: MockUpstream, earlier_poll: str
) -> None:
    """Threads pool / embedded mode (docs/architecture.md invariant 6): with -c 1, a message of
    4 slow requests has one running and three queued when its batch is cancelled. The cancel poll
    sees it; the queued three are skipped, not sent, and every row ends canceled. A poll
    that died earlier (of an error) is replaced, not taken for a running one."""
    watch = CancelWatch(client.store, poll_s=0.05, concurrency=1)
    if earlier_poll == "died":
        dead = threading.Thread(target=lambda: None)
        dead.start()
        dead.join()
        watch._watcher = dead
    batch_id, report = cancel_while_queued(client, settings, mock, watch, 800, join_s=30)
    assert mock.state.calls == 1, "queued attempts of a cancelled batch were sent"
    assert report.aborted == 3
    assert set(states(client.store, batch_id).values()) == {"canceled"}
    wait_for(lambda: watch._watcher is None, what="the idle cancel poll to end")


def cancel_while_queued(
    client: Client,
    settings: Settings,
    mock: MockUpstream,
    watch: CancelWatch,
    latency_ms: int,
    join_s: float,
) -> tuple[str, Report]:
    """A message of 4 slow requests run on a thread of its own with ``watch``; its batch is
    cancelled once the first call runs, and the message must end within ``join_s``."""
    batch_id = client.submit_batch([line(f"q{i}", mock_latency_ms=latency_ms) for i in range(4)])
    token, rows = client.store.claim("m1", "m1", 100, 100, time.time())
    reports: list[Report] = []
    runner = threading.Thread(
        target=lambda: reports.append(
            run_message(
                client.store, settings, token, [r.id for r in rows], Recorder(), watch=watch
            )
        )
    )
    runner.start()
    wait_for(lambda: mock.state.calls == 1, what="the first call to start")
    client.cancel_batch(batch_id)
    runner.join(timeout=join_s)
    assert not runner.is_alive()
    return batch_id, reports[0]


def test_an_attempt_that_waited_for_its_slot_asks_whether_its_batch_was_cancelled(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """docs/architecture.md invariant 6 with the default 5 s cancel poll: with -c 1, three of a
    message's four slow requests wait for the slot when their batch is cancelled. While they
    wait the watcher polls every CancelWatch.FRESH_S, so none of them is sent, long before the next
    5 s poll."""
    watch = CancelWatch(client.store, poll_s=5.0, concurrency=1)
    # join_s less than the poll interval
    batch_id, report = cancel_while_queued(client, settings, mock, watch, 600, join_s=4)
    assert mock.state.calls == 1, "waiting attempts of a cancelled batch were sent"
    assert report.aborted == 3
    assert set(states(client.store, batch_id).values()) == {"canceled"}


def test_under_gevent_an_attempt_that_waited_for_its_slot_is_not_sent_once_cancelled(
    pg_url: str, mock: MockUpstream
) -> None:
    """The same as a worker runs it (gevent, -c 1, the default 5 s poll), in an interpreter of
    its own: the three requests waiting for the slot when the batch is cancelled are never
    sent, the running one is aborted too (while attempts wait, the watcher polls every
    CancelWatch.FRESH_S), and the message ends well before the 5 s poll."""
    script = textwrap.dedent(
        f"""
        from gevent import monkey; monkey.patch_all()
        import time, gevent, requests
        from fusillade_celery.compat import patch_gevent_waits
        patch_gevent_waits()
        from fusillade_celery.cancel_watch import CancelWatch
        from fusillade_celery.execute import execute
        from fusillade_celery.settings import Settings
        from fusillade_celery.submit import Client
        from fusillade_celery.upstream import get_session
        settings = Settings().replace(
            database_url={pg_url!r}, upstream_url={mock.url!r}, timeout_ms=5000
        )
        client = Client(settings)
        body = {{"model": "m1", "messages": [], "mock_latency_ms": 600}}
        lines = [
            {{"custom_id": f"q{{i}}", "method": "POST", "url": "/v1/chat/completions",
              "body": body}}
            for i in range(4)
        ]
        batch_id = client.submit_batch(lines)
        token, rows = client.store.claim("m1", "m1", 100, 100, time.time())
        watch = CancelWatch(client.store, poll_s=5.0, concurrency=1)
        t0 = time.monotonic()
        run = gevent.spawn(
            execute, client.store, settings, get_session(), token, [r.id for r in rows],
            "w1", lambda *a: None, watch,
        )
        stats = {mock.url!r} + "/_mock/stats"
        while requests.get(stats, timeout=5).json()["calls"] < 1:
            gevent.sleep(0.01)  # until the first call runs; three wait for the slot
        client.cancel_batch(batch_id)
        report = run.get(timeout=4)
        states = {{r["state"] for r in client.store.request_rows(batch_id)}}
        print(report.aborted, sorted(states), time.monotonic() - t0 < 4.5)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["4", "['canceled']", "True"]
    assert mock.state.calls == 1, "waiting attempts of a cancelled batch were sent"


def test_write_back_keeps_bodies_and_errors_exactly(client: Client, settings: Settings) -> None:
    from fusillade_celery.states import RequestState
    from fusillade_celery.store import Finish

    batch_id = client.submit_batch([line(f"w{i}") for i in range(4)])
    token, claimed = client.store.claim("m1", "m1", 10, 10, time.time())
    ids = [c.id for c in claimed]
    client.store.start(ids, token, "w1", time.time())
    tricky = 'quote " backslash \\ newline \n tab \t unicode ü 😀 {"nested": "json"} \\u0041'
    due = time.time() + 30
    results = [
        Finish(ids[0], token, RequestState.COMPLETED, 200, tricky),
        Finish(ids[1], token, RequestState.COMPLETED, 200, None),
        Finish(ids[2], token, RequestState.FAILED, 400, tricky, {"kind": "x", "detail": tricky}),
        Finish(ids[3], token, RequestState.RETRYING, 503, "busy", {"kind": "y"}, not_before=due),
    ]
    assert client.store.finish(results, time.time()).changed == 4
    rows = {r["id"]: r for r in client.store.request_rows(batch_id)}
    assert rows[ids[0]]["response_body"] == tricky and rows[ids[0]]["state"] == "completed"
    assert rows[ids[1]]["response_body"] is None
    assert json.loads(rows[ids[2]]["error"])["detail"] == tricky
    assert (rows[ids[3]]["state"], rows[ids[3]]["attempt"]) == ("retrying", 1)
    assert rows[ids[3]]["not_before"] == pytest.approx(due)
