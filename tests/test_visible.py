"""Failures an operator can see: each model's last upstream error recorded (rate-limited) and
shown by ``status``; the rate-limited log line naming the model and the host, never the key;
execute messages naming their batches for Flower."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from fusillade_celery import claimer, failures
from fusillade_celery.app import configure
from fusillade_celery.failures import FailureLog, short_message, upstream_host
from fusillade_celery.follow import ProgressBar
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.settings import Settings
from fusillade_celery.states import ErrorKind
from fusillade_celery.store import ModelError, Store, WorkItem
from fusillade_celery.submit import Client
from fusillade_celery.tasks import REFILL, execute_requests, publish_execute
from fusillade_celery.upstream import Outcome

from .conftest import line
from .services import free_port, wait_for
from .test_cli_operator import clean_env, cli
from .test_execute import Recorder, run_claimed

KEY = "sk-test-secret-123"  # the conftest settings' upstream key
#: The Redis database of these tests (the suite's other tests use other numbers).
REDIS_DB = 8


def unreachable() -> str:
    """A 127.0.0.1 port nothing listens on: every connection is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def run_once(client: Client, settings: Settings) -> Recorder:
    """One claim and every message it gave, as a worker would run them."""
    rec = Recorder()
    claimer.claim_all(client.store, settings, rec.publish)
    run_claimed(client.store, settings, rec)
    return rec


def test_unreachable_upstream_is_recorded_per_model_with_its_host(settings: Settings) -> None:
    # Given a model routed to a port nothing listens on
    dead = unreachable()
    s = settings.replace(upstream_url=dead, backoff_ms=60_000, max_backoff_ms=60_000)
    client = Client(s)
    batch_id = client.submit_batch([line("a"), line("b")])
    # When its requests are attempted once
    run_once(client, s)
    # Then the model's last error names the kind and the host, never the key, and the
    # overview counts the requests retrying
    err = client.store.model_errors()["m1"]
    assert err.kind == "network_error"
    assert err.status_code is None
    assert err.host == dead.removeprefix("http://")
    assert KEY not in err.message and len(err.message) <= failures.MAX_MESSAGE
    assert err.message == "ConnectionError: [Errno 111] Connection refused"
    assert err.count >= 1
    (overview,) = client.store.model_overview(0.0)
    assert (overview.retrying, overview.in_flight, overview.pending) == (2, 0, 0)
    assert overview.model == "m1" and overview.last_error == err
    (by_batch,) = client.store.batch_overview(batch_id)
    assert by_batch.retrying == 2 and by_batch.last_error == err


def test_the_progress_bar_says_what_is_retrying_and_why(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = unreachable()
    s = settings.replace(upstream_url=dead, backoff_ms=60_000, max_backoff_ms=60_000)
    client = Client(s)
    batch_id = client.submit_batch([line("a"), line("b")])
    run_once(client, s)
    bar = ProgressBar(batch_id, client=client)
    bar(client.get_batch(batch_id))
    bar.close()
    shown = capsys.readouterr().err
    assert f"retrying=2 last error: network_error at {dead.removeprefix('http://')}" in shown


def test_a_503_is_recorded_with_its_status_and_a_short_snippet(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    client.submit_batch([line("a", mock_statuses=[503])])
    run_once(client, settings)
    err = client.store.model_errors()["m1"]
    assert (err.kind, err.status_code) == ("retriable_http_status", 503)
    assert err.message.startswith("HTTP 503")
    assert err.host == mock.url.removeprefix("http://")


def test_a_success_records_nothing(client: Client, settings: Settings) -> None:
    client.submit_batch([line("a"), line("b")])
    run_once(client, settings)
    assert client.store.model_errors() == {}
    assert client.store.model_overview(0.0) == []


def test_a_newer_error_replaces_an_older_one_and_counts_add(store: Store) -> None:
    # Given two workers writing the same model's errors out of order
    newer = ModelError("m1", "timeout", None, "late", "h:1", at=200.0, count=3)
    older = ModelError("m1", "network_error", None, "early", "h:1", at=100.0, count=2)
    store.record_model_error(newer)
    store.record_model_error(older)
    # Then the newer one stays, and the row counts both writes
    got = store.model_errors(["m1", "m2"])
    assert list(got) == ["m1"]
    assert (got["m1"].kind, got["m1"].message, got["m1"].at) == ("timeout", "late", 200.0)
    assert got["m1"].count == 5


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_are_written_and_logged_at_most_once_per_window(
    store: Store, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a process's failure log with a clock we move
    clock = Clock()
    flog = FailureLog(write_every_s=5.0, log_every_s=10.0, clock=clock)
    item = _item(upstream_url=None)
    failed = Outcome(ErrorKind.NETWORK_ERROR, detail=f"ConnectionError: refused {KEY}")
    caplog.set_level(logging.INFO, logger=failures.log.name)
    # When 30 attempts fail within one window
    for _ in range(30):
        flog.note(store, settings, item, failed, at=1.0)
    # Then one write and one log line, at INFO, naming the model and the host, not the key
    assert store.model_errors()["m1"].count == 1
    lines = _failure_lines(caplog)
    assert len(lines) == 1
    host = settings.upstream_url.removeprefix("http://")
    assert "model m1" in lines[0] and host in lines[0] and KEY not in caplog.text
    # And past both windows, the next failure writes and logs what was counted meanwhile
    clock.now += 10.0
    flog.note(store, settings, item, failed, at=2.0)
    assert store.model_errors()["m1"].count == 31
    lines = _failure_lines(caplog)
    assert len(lines) == 2 and "30 retriable upstream failures in 10 s" in lines[1]
    # And outcomes that are not the upstream's (the batch expired) are not counted
    flog.note(store, settings, item, Outcome(ErrorKind.BATCH_EXPIRED), at=3.0)
    clock.now += 10.0
    flog.note(store, settings, item, failed, at=4.0)
    assert store.model_errors()["m1"].count == 32


def _failure_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    records = [r for r in caplog.records if r.name == failures.log.name]
    assert all(r.levelno == logging.INFO for r in records)
    return [r.getMessage() for r in records]


def test_worker_log_line_through_execute_names_model_and_host(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    dead = unreachable()
    s = settings.replace(upstream_url=dead, upstream_api_key=KEY)
    client = Client(s)
    client.submit_batch([line(f"r{i}") for i in range(5)])
    caplog.set_level(logging.INFO, logger="fusillade_celery.failures")
    run_once(client, s)
    lines = [r.getMessage() for r in caplog.records if r.name == "fusillade_celery.failures"]
    assert len(lines) == 1, lines  # five failures, one line
    assert "model m1" in lines[0] and dead.removeprefix("http://") in lines[0]
    assert KEY not in caplog.text


def test_worker_logging_lets_the_lines_through_a_warning_root() -> None:
    logger = logging.getLogger("fusillade_celery.failures")
    root = logging.getLogger()
    saved = (logger.level, root.level)
    try:
        logger.setLevel(logging.NOTSET)
        root.setLevel(logging.WARNING)  # Celery's default --loglevel
        failures.worker_logging()
        assert logger.isEnabledFor(logging.INFO)
        logger.setLevel(logging.ERROR)  # a logging config said otherwise: it wins
        failures.worker_logging()
        assert not logger.isEnabledFor(logging.INFO)
        logger.setLevel(logging.NOTSET)
        root.setLevel(logging.ERROR)  # -l error
        failures.worker_logging()
        assert not logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(saved[0])
        root.setLevel(saved[1])


def test_hosts_and_messages_never_carry_credentials(settings: Settings) -> None:
    assert short_message(f"HTTP 503: echo Bearer {KEY}\n  more", (KEY,)) == (
        "HTTP 503: echo Bearer *** more"
    )
    assert len(short_message("x" * 5000)) == failures.MAX_MESSAGE
    s = settings.replace(upstream_url="https://user:pw@api.example.com:8443/v1")
    item = _item(upstream_url=None)
    assert upstream_host(item, s) == "api.example.com:8443"
    assert upstream_host(_item(upstream_url="http://u:p@[::1]:9/x"), s) == "[::1]:9"
    assert upstream_host(item, s.replace(upstream_url="")) is None


def _item(upstream_url: str | None) -> WorkItem:
    return WorkItem(
        id=1,
        token="t",
        custom_id="a",
        batch_id="b",
        model="m1",
        routed_model="m1",
        attempt=0,
        deadline=0.0,
        url="/v1/chat/completions",
        body="{}",
        upstream_url=upstream_url,
        api_key=None,
        batch_fields={},
    )


@pytest.fixture
def pg_settings(pg_url: str, mock: MockUpstream) -> Settings:
    s = Settings().replace(
        database_url=pg_url,
        broker_url="",
        upstream_url=mock.url,
        upstream_api_key=KEY,
        backoff_ms=50,
        max_backoff_ms=200,
        timeout_ms=2000,
    )
    configure(s)
    return s


def test_status_shows_retrying_and_the_last_error_beside_the_batch_object(
    pg_settings: Settings, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    # Given a batch whose upstream refuses connections, attempted once
    dead = unreachable()
    s = pg_settings.replace(upstream_url=dead, backoff_ms=60_000, max_backoff_ms=60_000)
    client = Client(s)
    batch_id = client.submit_batch([line("a"), line("b"), line("c", model="m2")])
    rec = Recorder()
    claimer.claim_model(client.store, s, rec.publish, "m1")
    run_claimed(client.store, s, rec)
    # When an operator asks for its status
    res = cli(["status", batch_id], clean_env(FUSILLADE_DATABASE_URL=s.database_url), tmp_path)
    # Then the Batch object is OpenAI's, with the models under a key of their own
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    extra = out.pop("fusillade")
    assert set(out) == set(client.get_batch(batch_id))
    m1, m2 = extra["models"]["m1"], extra["models"]["m2"]
    assert (m1["retrying"], m1["pending"], m1["in_flight"]) == (2, 0, 0)
    assert m1["last_error"]["kind"] == "network_error"
    assert m1["last_error"]["host"] == dead.removeprefix("http://")
    assert m2 == {"pending": 1, "in_flight": 0, "retrying": 0, "last_error": None}
    # And stderr says it in a line a person reads, with no key anywhere
    (said,) = [x for x in res.stderr.splitlines() if "m1:" in x]
    assert "2 retrying" in said and dead.removeprefix("http://") in said and "network_error" in said
    assert KEY not in res.stdout + res.stderr


@pytest.fixture
def broker(redis_base: str, settings: Settings) -> Iterator[redis.Redis]:
    """Redis database ``REDIS_DB`` as the broker, emptied before and after."""
    url = f"{redis_base}/{REDIS_DB}"
    r = redis.Redis.from_url(url)
    r.flushdb()
    configure(settings.replace(broker_url=url))
    yield r
    configure(settings)
    r.flushdb()
    r.close()


def queued(r: redis.Redis, queue: str) -> list[tuple[list, dict, dict]]:
    """(args, kwargs, headers) of every message waiting in ``queue``, taken off it."""
    out = []
    for raw in reversed(r.lrange(queue, 0, -1)):  # LPUSHed: the oldest is last
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        out.append((args, kwargs, message["headers"]))
    r.delete(queue)
    return out


def ran(result: Any) -> dict[str, Any]:
    """What a task run in this process (``apply``) returned. Not ``get()``: after an embedded
    run in this process, Celery takes the test for a task and refuses to wait."""
    assert result.successful(), result.traceback
    value: dict[str, Any] = result.result
    return value


def test_execute_messages_and_their_retries_name_their_batches(
    client: Client, settings: Settings, broker: redis.Redis
) -> None:
    # Given two batches of one model, claimed and published to the broker
    first = client.submit_batch([line("a", mock_statuses=[503, 200])])
    second = client.submit_batch([line("b")])
    assert claimer.claim_all(client.store, settings, publish_execute) == {"m1": 2}
    # Then each message carries its batch ids as a keyword Flower shows and searches
    (message,) = queued(broker, "model.m1")
    args, kwargs, headers = message
    assert kwargs == {"batch_ids": sorted([first, second])}
    assert first in headers["kwargsrepr"] and second in headers["kwargsrepr"]
    assert KEY not in json.dumps(message)
    # When a worker runs it and one request is retried
    result = ran(execute_requests.apply(args=args, kwargs=kwargs))
    wait_for(REFILL.idle, what="the refill claims the task started")
    # Then the retry message names the batch of the retried request only
    assert result["retrying"] == 1 and result["batch_ids"] == sorted([first, second])
    (retry,) = queued(broker, "model.m1")
    assert retry[1] == {"batch_ids": [first]}
    assert retry[2]["retries"] == 1


def test_messages_queued_before_batch_ids_existed_still_run(
    client: Client, settings: Settings, broker: redis.Redis
) -> None:
    batch_id = client.submit_batch([line("a")])
    claimer.claim_all(client.store, settings, publish_execute)
    ((args, _, _),) = queued(broker, "model.m1")
    assert ran(execute_requests.apply(args=args))["completed"] == 1  # no batch_ids keyword
    wait_for(REFILL.idle, what="the refill claims the task started")
    assert client.store.request_rows(batch_id)[0]["state"] == "completed"


def test_a_worker_at_celerys_default_log_level_says_which_upstream_fails(
    pg_settings: Settings, redis_base: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Before: an unreachable upstream left nothing in the log of a worker started without
    ``-l``. Now one line per model every ``LOG_EVERY_S`` names the model and the host."""
    import subprocess
    import sys

    dead = unreachable()
    broker_url = f"{redis_base}/10"  # this test's Redis database
    redis.Redis.from_url(broker_url).flushdb()
    env = clean_env(
        FUSILLADE_DATABASE_URL=pg_settings.database_url,
        FUSILLADE_BROKER_URL=broker_url,
        FUSILLADE_UPSTREAM_URL=dead,
        FUSILLADE_UPSTREAM_API_KEY=KEY,
        FUSILLADE_BACKOFF_MS="100",
        FUSILLADE_MAX_BACKOFF_MS="200",
    )
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "fusillade_celery", "worker"]
            + ["-Q", "model.m1", "-P", "threads", "-c", "4"],  # no -l: Celery's WARNING
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    s = pg_settings.replace(broker_url=broker_url, upstream_url=dead)
    configure(s)
    client = Client(s)
    try:
        wait_for(lambda: client.store.worker_rows(), 60, what="the worker's heartbeat row")
        client.submit_batch([line("a")])  # nudges the claimer, which the worker runs
        text = wait_for(
            lambda: "retriable upstream failure" in log.read_text() and log.read_text(),
            60,
            what=f"the failure line in {log}",
        )
    finally:
        worker.terminate()
        worker.wait(30)
        configure(pg_settings)
        redis.Redis.from_url(broker_url).flushdb()
    (said,) = [x for x in text.splitlines() if "retriable upstream failure" in x]
    assert "model m1" in said and dead.removeprefix("http://") in said and "INFO" in said
    assert said.endswith("network_error ConnectionError: [Errno 111] Connection refused")
    assert KEY not in text
