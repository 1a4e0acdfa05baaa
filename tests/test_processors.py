"""The request-processor seam: a processor named by ``FUSILLADE_PROCESSORS`` or registered
in Python handles its path through the real execute path (claim, start, fenced write-back),
other paths keep the default call, and a bad setting stops a worker at start with one line
naming the variable."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusillade_celery import claimer, processors
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.settings import ConfigError, Settings
from fusillade_celery.submit import Client

from .conftest import line
from .custom_processor import Crashing, Echo
from .test_cli_operator import clean_env, error_lines
from .test_execute import Recorder, run_claimed, run_message, states

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_url(pg_url: str) -> str:
    """PostgreSQL only: the seam is the same on either engine (``test_execute`` runs both)."""
    return pg_url


def outputs(client: Client, batch_id: str) -> dict[str, dict]:
    return {o["custom_id"]: o for o in client.iter_results(batch_id)}


def test_a_processor_named_by_the_setting_handles_its_path_and_only_it(
    settings: Settings, mock: MockUpstream
) -> None:
    custom = settings.replace(processors={"/v1/annotated": "tests.custom_processor:factory"})
    client = Client(custom)
    annotated = client.submit_batch(
        [line("a", url="/v1/annotated"), line("b", url="/v1/annotated")]
    )
    plain = client.submit_batch([line("c")])
    rec = Recorder()
    claimer.claim_all(client.store, custom, rec.publish)
    run_claimed(client.store, custom, rec)
    out = outputs(client, annotated)
    assert {o["response"]["body"]["processed_by"] for o in out.values()} == {"annotating"}
    assert out["a"]["response"]["body"]["choices"][0]["message"]["content"] == "reply to a (call 1)"
    assert "processed_by" not in outputs(client, plain)["c"]["response"]["body"]
    assert sorted(e["path"] for e in mock.state.log) == [
        "/v1/annotated",
        "/v1/annotated",
        "/v1/chat/completions",
    ]


def test_a_processor_registered_in_python_handles_its_path(
    settings: Settings, mock: MockUpstream
) -> None:
    processors.register_processor("/v1/echo", Echo())
    try:
        client = Client(settings)
        batch_id = client.submit_batch([line("e", url="/v1/echo")])
        rec = Recorder()
        claimer.claim_all(client.store, settings, rec.publish)
        run_claimed(client.store, settings, rec)
    finally:
        processors.unregister_processor("/v1/echo")
    body = outputs(client, batch_id)["e"]["response"]["body"]
    assert body["object"] == "echo" and json.loads(body["request"])["model"] == "m1"
    assert mock.state.calls == 0
    with pytest.raises(Exception, match="unsupported endpoint '/v1/echo'"):
        client.submit_batch([line("e", url="/v1/echo")])  # unregistered: refused again


def test_a_processor_that_raises_fails_its_request_alone_as_retriable(
    settings: Settings, mock: MockUpstream
) -> None:
    """A bug in a processor must not take the message's other requests with it."""
    processors.register_processor("/v1/crash", Crashing())
    try:
        client = Client(settings)
        crashed = client.submit_batch([line("x", url="/v1/crash")])
        fine = client.submit_batch([line("ok")])
        token, rows = client.store.claim("m1", "m1", 10, 10, time.time())
        report = run_message(client.store, settings, token, [r.id for r in rows], Recorder())
    finally:
        processors.unregister_processor("/v1/crash")
    assert (report.completed, report.retrying) == (1, 1)
    assert states(client.store, fine) == {"ok": "completed"}
    (row,) = client.store.request_rows(crashed)
    error = json.loads(row["error"])
    assert row["state"] == "retrying" and error["kind"] == "task_terminated"
    assert "RuntimeError: a bug in the processor" in error["detail"]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("tests.no_such_module:factory", "cannot import 'tests.no_such_module'"),
        ("tests.custom_processor:nothing", "has no attribute 'nothing'"),
        ("tests.custom_processor:NOT_CALLABLE", "is not callable"),
        ("tests.custom_processor:failing_factory", "the factory raised RuntimeError"),
        ("tests.custom_processor:without_process", "has no process()"),
    ],
)
def test_a_processor_that_cannot_be_loaded_is_one_line_naming_the_variable(
    spec: str, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        processors.load(Settings(processors={"/v1/x": spec}))
    message = str(caught.value)
    assert message.startswith("FUSILLADE_PROCESSORS: /v1/x=") and says in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "raw", ["/v1/x", "v1/x=a.b:c", "/v1/x=a.b", "/v1/x=a b:c", "/v1/x=a.b:c:d"]
)
def test_an_unparsable_processors_setting_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="^FUSILLADE_PROCESSORS: "):
        Settings.from_env({"FUSILLADE_PROCESSORS": raw})


def test_a_worker_refuses_to_start_with_a_processor_it_cannot_load(tmp_path: Path) -> None:
    env = clean_env(
        FUSILLADE_BROKER_URL="redis://127.0.0.1:6379/14",
        FUSILLADE_PROCESSORS="/v1/x=tests.no_such_module:factory",
        PYTHONPATH=str(ROOT),
    )
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "fusillade_celery", "worker", "-P", "gevent"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    (error,) = error_lines(done.stderr)
    assert "FUSILLADE_PROCESSORS: /v1/x=tests.no_such_module:factory: cannot import" in error
    assert "Traceback" not in done.stderr + done.stdout
