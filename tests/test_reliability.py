"""The second round of fault tolerance, at the level of the store and the execute path (real
database, real mock upstream): no request is sent twice while its first attempt is alive,
poison requests are bounded by max_retries, retries never start early, the batch deadline is
the one the Batch object shows, batch rows are locked in one order, and a batch's own key does
not outlive the batch. SQLite and PostgreSQL unless a test says otherwise."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet
from sqlalchemy.exc import OperationalError

from fusillade_celery import maintenance, workers
from fusillade_celery.cancel_watch import CancelWatch
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.settings import Settings
from fusillade_celery.states import RequestState
from fusillade_celery.store import Finish, Store
from fusillade_celery.submit import Client

from .conftest import line
from .services import wait_for
from .test_execute import Recorder, run_message, states


def test_requests_waiting_for_a_slot_are_not_reaped_and_sent_twice(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """Given a worker with -c 1 and one message of 5 requests of 0.6 s each, and a reaper
    running every 0.1 s with a 1.5 s processing timeout: the last request waits 2.4 s for the
    slot, longer than the timeout. While the message runs, none of its rows is reaped, so
    each request is sent exactly once and every row completes under its first token (before
    the fix the waiting rows were reaped at 1.5 s and their results fenced out)."""
    s = settings.replace(processing_timeout_ms=1500)
    batch_id = client.submit_batch([line(f"w{i}", mock_latency_ms=600) for i in range(5)])
    token, rows = client.store.claim("m1", "m1", 100, 100, time.time())
    watch = CancelWatch(client.store, poll_s=5.0, concurrency=1, processing_timeout_s=1.5)
    stop = threading.Event()
    reaped: list[int] = []

    def reaper() -> None:
        while not stop.wait(0.1):
            reaped.append(maintenance.reap(client.store, s))

    thread = threading.Thread(target=reaper)
    thread.start()
    try:
        report = run_message(client.store, s, token, [r.id for r in rows], Recorder(), watch=watch)
    finally:
        stop.set()
        thread.join()
    assert sum(reaped) == 0
    assert report.completed == 5
    assert set(states(client.store, batch_id).values()) == {"completed"}
    assert sorted(mock.state.by_custom_id.values()) == [1] * 5


def _processing_on_a_dead_worker(client: Client, now: float) -> tuple[str, str, int]:
    """A one-request batch whose request is processing on worker "dead", marked dead."""
    batch_id = client.submit_batch([line("poison")])
    client.store.heartbeat("dead", "host", 1, "model.m1", now)
    client.store.mark_worker_dead("dead", now)
    token, rows = client.store.claim("m1", "m1", 5, 5, now)
    assert len(client.store.start([rows[0].id], token, "dead", now)) == 1
    return batch_id, token, rows[0].id


def test_a_request_whose_worker_dies_counts_an_attempt_and_fails_at_max_retries(
    client: Client, settings: Settings
) -> None:
    """Given max_retries 2 and a request whose call kills its worker every time: each time the
    reaper takes it back from the dead worker counts an attempt (task_terminated), and the
    third time it fails with that reason instead of being retried until the batch expires."""
    s = settings.replace(max_retries=2, backoff_ms=1)
    batch_id, _, rid = _processing_on_a_dead_worker(client, time.time())
    for attempt in (1, 2):
        assert maintenance.reap(client.store, s) == 1
        row = client.store.request_rows(batch_id)[0]
        assert (row["state"], row["attempt"]) == ("pending", attempt)
        assert json.loads(row["error"])["kind"] == "task_terminated"
        time.sleep(0.01)  # the reaped row's backoff (1 ms) has passed
        token, rows = client.store.claim("m1", "m1", 5, 5, time.time())
        assert [r.id for r in rows] == [rid]
        assert len(client.store.start([rid], token, "dead", time.time())) == 1
    assert maintenance.reap(client.store, s) == 1
    row = client.store.request_rows(batch_id)[0]
    assert row["state"] == "failed" and row["attempt"] == 2
    maintenance.finalize(client.store, s)
    errors = list(client.iter_results(batch_id, errors=True))
    assert [e["error"]["code"] for e in errors] == ["task_terminated"]


def test_a_reaped_claim_that_was_never_sent_keeps_its_attempt_count(
    client: Client, settings: Settings
) -> None:
    batch_id = client.submit_batch([line("a")])
    client.store.claim("m1", "m1", limit=5, batch_size=5, now=time.time() - 120)
    assert maintenance.reap(client.store, settings) == 1
    row = client.store.request_rows(batch_id)[0]
    assert (row["state"], row["attempt"], row["error"]) == ("pending", 0, None)


def test_the_stale_worker_rule_waits_until_this_process_reaches_the_database_again(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a database outage every heartbeat is old. A reaper whose own heartbeats have
    only just reached the database again does not take live workers' requests as those of
    dead ones; once it has reached it for a whole stale threshold, it does."""
    batch_id = client.submit_batch([line("a")])
    t0 = time.time()
    client.store.heartbeat("silent", "host", 1, "model.m1", t0 - 60)  # beats 60 s ago
    token, rows = client.store.claim("m1", "m1", 5, 5, t0)
    client.store.start([rows[0].id], token, "silent", t0)
    hb = workers.Heartbeat(client.store, settings, "model.m1")
    monkeypatch.setattr(workers, "_mine", [hb])
    hb.reachable_since = time.monotonic()  # the outage just ended here
    assert maintenance.reap(client.store, settings) == 0
    hb.reachable_since = time.monotonic() - settings.stale_worker_threshold_ms / 1000.0 - 1
    assert maintenance.reap(client.store, settings) == 1
    assert client.store.request_rows(batch_id)[0]["state"] == "pending"


def test_a_redelivered_message_does_not_start_a_retry_before_its_backoff(
    client: Client, settings: Settings
) -> None:
    """The original message of a request that is now ``retrying`` (due in 10 s) is delivered
    again (its worker was lost after the write-back): it must not start the retry early."""
    batch_id = client.submit_batch([line("a")])
    now = time.time()
    token, rows = client.store.claim("m1", "m1", 5, 5, now)
    client.store.start([rows[0].id], token, "w1", now)
    retry = Finish(rows[0].id, token, RequestState.RETRYING, 503, "busy", {"kind": "x"}, now + 10)
    assert client.store.finish([retry], now).changed == 1
    assert client.store.start([rows[0].id], token, "w1", time.time()) == []
    assert client.store.request_rows(batch_id)[0]["state"] == "retrying"
    # once due, the countdown message starts it
    assert len(client.store.start([rows[0].id], token, "w1", now + 10)) == 1


def test_the_deadline_is_the_expires_at_the_batch_object_shows(client: Client) -> None:
    batch_id = client.submit_batch([line("a")], completion_window="1h")
    shown = client.get_batch(batch_id)["expires_at"]
    assert client.store.request_rows(batch_id)[0]["deadline"] == shown


def test_no_request_is_sent_at_or_after_the_deadline(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """A request claimed before the deadline whose attempt starts after it (a late countdown,
    a long wait for a slot) is not sent: it ends batch_expired. Rows of a batch past its
    deadline are not claimed at all."""
    batch_id = client.submit_batch([line("a"), line("b")], completion_window="2s")
    token, rows = client.store.claim("m1", "m1", 1, 1, time.time())
    deadline = client.get_batch(batch_id)["expires_at"]
    wait_for(lambda: time.time() >= deadline, 5, what="the deadline")
    _, late = client.store.claim("m1", "m1", 5, 5, time.time())
    assert late == []  # "b" is past the deadline: never claimed
    report = run_message(client.store, settings, token, [rows[0].id], Recorder())
    assert report.failed == 1
    assert mock.state.calls == 0
    row = client.store.request_rows(batch_id)[0]
    assert json.loads(row["error"])["kind"] == "batch_expired"


def test_stop_before_deadline_moves_the_cutoff(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    s = settings.replace(stop_before_deadline_ms=3_601_000)  # more than a 1 h window
    client.submit_batch([line("a")], completion_window="1h")
    _, rows = client.store.claim("m1", "m1", 5, 5, time.time(), stop_before_s=3601)
    assert rows == []
    _, rows = client.store.claim("m1", "m1", 5, 5, time.time(), stop_before_s=0)
    token = client.store.request_rows(rows[0].batch_id)[0]["claim_token"]
    report = run_message(client.store, s, token, [rows[0].id], Recorder())
    assert report.failed == 1 and mock.state.calls == 0


class _Ids:
    """Stands in for ``uuid`` in ``intake``: file and batch ids from a list, in order (a
    submit takes four: input file, batch, output file, error file)."""

    def __init__(self, prefixes: list[str]):
        self.prefixes = iter(prefixes)

    def uuid4(self) -> uuid.UUID:
        return uuid.UUID(next(self.prefixes).ljust(32, "0"))


@pytest.mark.parametrize("pass_name", ["finalize", "expire"])
def test_finalize_and_expire_lock_batch_rows_in_id_order(
    pg_url: str, mock: MockUpstream, monkeypatch: pytest.MonkeyPatch, pass_name: str
) -> None:
    """Both passes lock the batches they close in id order, so two of them (beat's and a
    worker's, or an expiry and a finalize) can wait for each other but never deadlock. The
    batch last in id order is stored first (first in physical order) and locked elsewhere:
    a pass that locks in id order already holds the other one while it waits."""
    client = Client(Settings().replace(database_url=pg_url, upstream_url=mock.url))
    store = client.store
    ids = _Ids(["f1", "ff", "e1", "e2", "f2", "00", "e3", "e4"])
    monkeypatch.setattr("fusillade_celery.intake.uuid", ids)
    last = client.submit_batch([line("b1")])  # batch_ff...: stored first, last by id
    first = client.submit_batch([line("a1")])  # batch_00...
    assert first < last
    if pass_name == "finalize":
        for batch_id in (last, first):
            store.cancel_batch(batch_id, time.time())  # every request terminal

        def run() -> object:
            return maintenance.finalize_now(store, None)
    else:

        def run() -> object:
            return store.expire_batches(time.time() + 10**9, 0)

    admin = pg_url.replace("postgresql+psycopg://", "postgresql://")
    result: list[object] = []
    with psycopg.connect(admin) as holder, psycopg.connect(admin, autocommit=True) as probe:
        holder.execute("SELECT 1 FROM batches WHERE id = %s FOR UPDATE", (last,))
        thread = threading.Thread(target=lambda: result.append(run()))
        thread.start()
        wait_for(
            lambda: (
                probe.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                ).fetchone()[0]  # type: ignore[index]
                > 0
            ),
            10,
            what=f"the {pass_name} pass to wait for the locked batch",
        )
        with pytest.raises(psycopg.errors.LockNotAvailable):
            probe.execute("SELECT 1 FROM batches WHERE id = %s FOR UPDATE NOWAIT", (first,))
        holder.rollback()
        thread.join(10)
    assert result and sorted(result[0]) == sorted([first, last])  # type: ignore[call-overload]


def test_a_batch_api_key_is_erased_when_the_batch_ends(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    batch_id = client.submit_batch([line("a")], upstream=mock.url, api_key="sk-batch-own-42")
    assert client.store.get_batch_row(batch_id)["upstream_api_key"] == "sk-batch-own-42"
    rec = Recorder()
    token, rows = client.store.claim("m1", "m1", 5, 5, time.time())
    run_message(client.store, settings, token, [r.id for r in rows], rec)
    assert mock.state.log[0]["headers"]["authorization"] == "Bearer sk-batch-own-42"
    maintenance.finalize(client.store, settings)
    assert client.get_batch(batch_id)["status"] == "completed"
    assert client.store.get_batch_row(batch_id)["upstream_api_key"] is None


def test_with_a_secret_key_the_batch_api_key_is_stored_encrypted(
    db_url: str, mock: MockUpstream
) -> None:
    secret = Fernet.generate_key().decode()
    s = Settings().replace(database_url=db_url, secret_key=secret)
    client = Client(s)
    batch_id = client.submit_batch([line("a")], upstream=mock.url, api_key="sk-sealed-77")
    stored = client.store.get_batch_row(batch_id)["upstream_api_key"]
    assert "sk-sealed-77" not in stored and stored.startswith("fernet:")
    token, rows = client.store.claim("m1", "m1", 5, 5, time.time())
    # a worker without the secret key cannot open it: builder_error, nothing sent
    wrong = run_message(client.store, s.replace(secret_key=""), token, [rows[0].id], Recorder())
    assert wrong.failed == 1 and mock.state.calls == 0
    error = json.loads(client.store.request_rows(batch_id)[0]["error"])
    assert error["kind"] == "builder_error" and "FUSILLADE_SECRET_KEY" in error["detail"]
    batch2 = client.submit_batch([line("b")], upstream=mock.url, api_key="sk-sealed-77")
    token, rows = client.store.claim("m1", "m1", 5, 5, time.time())
    assert run_message(client.store, s, token, [rows[0].id], Recorder()).completed == 1
    assert mock.state.log[-1]["headers"]["authorization"] == "Bearer sk-sealed-77"
    assert client.store.get_batch_row(batch2)["upstream_api_key"] != "sk-sealed-77"


def test_a_worker_refuses_a_batch_upstream_outside_its_allowed_list(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """The submitter's environment allowed the upstream; the worker's does not: the request
    fails builder_error and nothing is sent to it."""
    batch_id = client.submit_batch([line("a")], upstream=mock.url)
    worker_settings = settings.replace(allowed_upstreams=("https://api.example.com",))
    token, rows = client.store.claim("m1", "m1", 5, 5, time.time())
    report = run_message(client.store, worker_settings, token, [rows[0].id], Recorder())
    assert report.failed == 1 and mock.state.calls == 0
    error = json.loads(client.store.request_rows(batch_id)[0]["error"])
    assert "FUSILLADE_ALLOWED_UPSTREAMS" in error["detail"]


def test_touch_restarts_only_the_processing_clock_of_rows_still_held(
    client: Client, store: Store
) -> None:
    client.submit_batch([line("a"), line("b")])
    t0 = time.time() - 100
    token, rows = store.claim("m1", "m1", 5, 5, t0)
    store.start([r.id for r in rows], token, "w1", t0)
    assert store.touch_started([(rows[0].id, token), (rows[1].id, "another-token")], t0 + 50) == 1
    started = {r["id"]: r["started_at"] for r in store.request_rows(rows[0].batch_id)}
    assert started == {rows[0].id: t0 + 50, rows[1].id: t0}


class _HeartbeatDb:
    """Stands in for the store of a Heartbeat: reachable or not, as the test says."""

    def __init__(self, reachable: bool = True):
        self.reachable = reachable

    def heartbeat(self, *_: object, **__: object) -> None:
        if not self.reachable:
            raise OperationalError("heartbeat", {}, Exception("connection refused"))

    def mark_worker_dead(self, *_: object, **__: object) -> None:
        pass


@pytest.fixture
def own_heartbeat() -> Iterator[Callable[[_HeartbeatDb], workers.Heartbeat]]:
    """Registers a heartbeat of this process (as a worker has) on a stand-in database."""

    def register(db: _HeartbeatDb) -> workers.Heartbeat:
        hb = workers.start(db, Settings(), "model.m1")  # type: ignore[arg-type]
        hb._stop.set()  # beaten by the test, not by its thread
        return hb

    yield register
    workers._mine.clear()


def test_a_thawed_worker_does_not_send_rows_taken_from_it_meanwhile(
    client: Client, own_heartbeat: Callable[[_HeartbeatDb], workers.Heartbeat]
) -> None:
    """A worker frozen long enough to be taken for dead, then thawed: its first heartbeat
    goes through, and an attempt it had started before the freeze, still waiting for a slot,
    must not be sent: its row was reaped and given to another worker meanwhile."""
    store = client.store
    batch_id = client.submit_batch([line("a")])
    token, rows = store.claim("m1", "m1", 5, 5, time.time())
    store.start([rows[0].id], token, "frozen", time.time())
    created = time.monotonic()  # the attempt is made, then the process freezes
    hb = own_heartbeat(_HeartbeatDb())
    hb.last_ok = time.monotonic() - 100  # 100 s without a heartbeat
    assert store.reap(time.time() + 1, 60, 0.0) == 1  # the reaper took the row meanwhile
    hb._beat_and_note()  # thawed: a heartbeat goes through
    watch = CancelWatch(store, poll_s=5.0)
    out = watch._unless_cancelled((rows[0].id, token), batch_id, lambda: "sent", created)
    assert out != "sent"
    # an attempt made after the thaw is not checked (no query per call)
    assert not workers.may_have_been_reaped(time.monotonic())


def test_when_the_check_cannot_be_made_the_request_is_not_sent(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that may have been taken for dead asks before each call whether the row is
    still its own; if it cannot ask (its database connection is gone, perhaps only its own),
    it does not send: a reclaim costs a delay, a second call may cost money."""
    monkeypatch.setattr(workers, "may_have_been_reaped", lambda since: True)

    def unreachable(*_: object) -> bool:
        raise OperationalError("still_held", {}, Exception("connection refused"))

    monkeypatch.setattr(client.store, "still_held", unreachable)
    watch = CancelWatch(client.store, poll_s=5.0)
    watch.LOST_CHECK_PATIENCE_S = 0.3  # how long it waits for the database (60 s by default)
    assert watch._unless_cancelled((1, "token"), "batch", lambda: "sent", 0.0) != "sent"
    # a database back within the patience answers, and a row still held is sent
    answers = iter([OperationalError("still_held", {}, Exception("refused")), True])

    def back_soon(*_: object) -> bool:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return bool(answer)

    monkeypatch.setattr(client.store, "still_held", back_soon)
    watch.LOST_CHECK_PATIENCE_S = 5.0
    assert watch._unless_cancelled((1, "token"), "batch", lambda: "sent", 0.0) == "sent"


def test_a_heartbeat_that_fails_at_start_pauses_the_stale_rule_until_it_beats(
    client: Client, own_heartbeat: Callable[[_HeartbeatDb], workers.Heartbeat]
) -> None:
    """A worker started while the database restarts: its first heartbeat fails. It is not
    an error that ends the heartbeat; meanwhile its reaper does not take a live worker's
    requests (whose heartbeat is old for the same reason) as a dead one's."""
    db = _HeartbeatDb(reachable=False)
    hb = own_heartbeat(db)
    assert workers.db_reachable_for() == 0.0
    assert workers.may_have_been_reaped(time.monotonic())
    now = time.time()
    client.store.heartbeat("live", "host", 1, "model.m1", now - 60)
    client.submit_batch([line("a")])
    token, rows = client.store.claim("m1", "m1", 5, 5, now)
    client.store.start([rows[0].id], token, "live", now)
    assert maintenance.reap(client.store, client.settings, now) == 0
    db.reachable = True
    hb._beat_and_note()
    assert workers.db_reachable_for() < 1.0 and not workers.may_have_been_reaped(time.monotonic())


def test_rows_a_hand_off_started_are_run_when_its_reply_was_lost(
    client: Client, settings: Settings
) -> None:
    """The write-back with hand-off commits, its reply is lost and the database stays away
    for a moment: the plain write-back that follows finds the requests the hand-off started
    (by the token it chose) so they are run, not left processing on a live worker."""
    from fusillade_celery.execute import _write
    from fusillade_celery.store import HandOff, new_token

    store = client.store
    batch_id = client.submit_batch([line(f"h{i}") for i in range(3)])
    now = time.time()
    token, rows = store.claim("m1", "m1", 1, 1, now)  # one slot: the others stay pending
    items = store.start([rows[0].id], token, "w1", now)
    real_finish = store.finish

    lost: list[bool] = []

    def reply_lost(results: Any, at: float, hand_off: HandOff | None = None) -> Any:
        written = real_finish(results, at, hand_off)  # committed ...
        if not lost:  # ... the first reply lost, then the database answers again
            lost.append(True)
            raise OperationalError("finish", {}, Exception("server closed the connection"))
        return written

    store.finish = reply_lost  # type: ignore[method-assign]
    done = [Finish(items[0].id, token, RequestState.COMPLETED, 200, "{}")]
    written = _write(store, done, now, HandOff("m1", "w1", token=new_token()), 1.0)
    started = [i.custom_id for i in written.started]
    assert started == ["h1"]
    assert states(store, batch_id) == {"h0": "completed", "h1": "processing", "h2": "pending"}


def test_a_deleted_or_cancelled_batch_loses_its_api_key_at_once(
    client: Client, mock: MockUpstream
) -> None:
    deleted = client.submit_batch([line("a")], upstream=mock.url, api_key="sk-gone-1")
    cancelled = client.submit_batch([line("b")], upstream=mock.url, api_key="sk-gone-2")
    client.cancel_batch(cancelled)
    client.delete_batch(deleted)
    with client.store.engine.connect() as conn:
        keys = conn.exec_driver_sql("SELECT upstream_api_key FROM batches").scalars().all()
    assert keys == [None, None]


def test_a_batch_whose_last_requests_ran_out_of_time_reads_expired(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """Its last request was claimed in time but its attempt came after the deadline: it
    ended batch_expired before any expiry pass, and the batch reads ``expired``, not
    ``completed``."""
    batch_id = client.submit_batch([line("a"), line("b")], completion_window="2s")
    token, rows = client.store.claim("m1", "m1", 10, 10, time.time())
    run_message(client.store, settings, token, [rows[0].id], Recorder())
    deadline = client.get_batch(batch_id)["expires_at"]
    wait_for(lambda: time.time() >= deadline, 5, what="the deadline")
    run_message(client.store, settings, token, [rows[1].id], Recorder())
    maintenance.finalize_now(client.store, [batch_id])
    batch = client.get_batch(batch_id)
    assert batch["status"] == "expired"
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}


def test_one_reaper_pass_takes_back_at_most_unclaim_batch_size(
    client: Client, settings: Settings
) -> None:
    """After a mass failure (a worker holding many requests dies), each reaper pass returns
    at most FUSILLADE_UNCLAIM_BATCH_SIZE of them, so no pass is one giant transaction."""
    s = settings.replace(unclaim_batch_size=100)
    batch_id = client.submit_batch([line(f"s{i}") for i in range(250)])
    client.store.claim("m1", "m1", 1000, 1000, time.time() - 120)  # claims gone stale
    assert [maintenance.reap(client.store, s) for _ in range(4)] == [100, 100, 50, 0]
    assert set(states(client.store, batch_id).values()) == {"pending"}
