"""Streamed upstream calls through the execute path, against the real mock over HTTP: the same
file gives the same output with and without streaming; faults in a stream are classified,
retried and then completed; a cancel aborts a streamed call under threads and under gevent."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from fusillade_celery import claimer
from fusillade_celery.cancel_watch import CancelWatch
from fusillade_celery.execute import Report
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.settings import Settings
from fusillade_celery.submit import Client

from .conftest import line
from .services import wait_for
from .test_execute import Recorder, run_claimed, run_message, states

CHAT, TEXT, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
LINES: dict[str, list[dict[str, Any]]] = {
    CHAT: [
        line("plain"),
        line("n2", n=2, logprobs=True),
        line("tools", mock_tool_calls=[{"name": "find", "arguments": {"q": "x" * 40}}]),
        line("refusal", mock_refusal="Not that."),
        line("asks", stream=True),  # streamed either way: reassembled, not raw event text
    ],
    TEXT: [line("t1", url=TEXT, prompt="p"), line("t2", url=TEXT, prompt="p", logprobs=2)],
    RESPONSES: [line("r1", url=RESPONSES, input="hi")],
}


@pytest.fixture
def db_url(pg_url: str) -> str:
    """PostgreSQL only: streaming is the same on either engine (``test_execute`` runs both)."""
    return pg_url


def run_file(client: Client, settings: Settings, lines: list[dict[str, Any]]) -> list[dict]:
    """Submit and run ``lines`` one request at a time (so the mock numbers its replies in the
    same order each run), then read the output file's lines."""
    batch_id = Client(settings).submit_batch(lines)
    rec = Recorder()
    claimer.claim_all(client.store, settings, rec.publish)
    run_claimed(client.store, settings, rec)
    return [{k: v for k, v in o.items() if k != "id"} for o in client.iter_results(batch_id)]


@pytest.mark.parametrize("path", [CHAT, TEXT, RESPONSES])
def test_the_same_file_gives_the_same_output_with_and_without_streaming(
    client: Client, settings: Settings, mock: MockUpstream, path: str
) -> None:
    buffered = run_file(client, settings, LINES[path])
    mock.state.reset()
    streamed_settings = settings.replace(stream_endpoints=frozenset({path}))
    streamed = run_file(client, streamed_settings, LINES[path])
    assert all(e.get("stream") for e in mock.state.log)  # every call of the second run
    assert len(streamed) == len(LINES[path]) and all(o["error"] is None for o in streamed)
    assert streamed == buffered


def test_faults_in_a_stream_are_classified_and_retried_until_it_completes(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    streamed = settings.replace(
        stream_endpoints=frozenset({CHAT}), stream_idle_timeout_ms=300, backoff_ms=50
    )
    batch_id = Client(streamed).submit_batch(
        [
            line("error", mock_stream_error=503),
            line("bad", mock_stream_error=400),
            line("stall", mock_stream_stall_ms=2000),
            line("truncated", mock_stream_truncate=True),
            line("empty", mock_stream_empty=True),
            line("cut", mock_stream_fail_after=2),
        ]
    )
    rec = Recorder()
    claimer.claim_all(client.store, streamed, rec.publish)
    run_claimed(client.store, streamed, rec)
    rows = {r["custom_id"]: r for r in client.store.request_rows(batch_id)}
    assert rows["bad"]["state"] == "failed"  # a 400 in the stream is not retried
    kinds = {cid: json.loads(r["error"])["kind"] for cid, r in rows.items()}
    assert kinds == {
        "error": "retriable_http_status",
        "bad": "non_retriable_http_status",
        "stall": "timeout",
        "truncated": "network_error",
        "empty": "network_error",
        "cut": "network_error",
    }
    assert rows["error"]["response_status"] == 503
    retrying = {cid for cid, r in rows.items() if r["state"] == "retrying"}
    assert retrying == {"error", "stall", "truncated", "empty", "cut"}
    # the retries (each fault is on a line's first call only) complete
    time.sleep(0.1)
    for r in rows.values():
        if r["custom_id"] in retrying:
            run_message(client.store, streamed, r["claim_token"], [r["id"]], rec)
    assert states(client.store, batch_id) == {
        "error": "completed",
        "bad": "failed",
        "stall": "completed",
        "truncated": "completed",
        "empty": "completed",
        "cut": "completed",
    }
    out = {o["custom_id"]: o for o in client.iter_results(batch_id)}
    assert out["stall"]["response"]["body"]["choices"][0]["message"]["content"] == (
        "reply to stall (call 2)"
    )


def test_a_cancel_aborts_a_streamed_call_without_gevent(
    client: Client, settings: Settings, mock: MockUpstream
) -> None:
    """Threads pool / embedded mode: a read cannot be interrupted, but the stream is left at
    its next read once the cancel poll has seen the cancel (here: a keep-alive comment every
    50 ms of a 10 s stall), well before the stream would have ended."""
    streamed = settings.replace(stream_endpoints=frozenset({CHAT}))
    batch_id = Client(streamed).submit_batch(
        [line("long", mock_stream_stall_ms=10_000, mock_stream_keepalive_ms=50)]
    )
    token, rows = client.store.claim("m1", "m1", 10, 10, time.time())
    watch = CancelWatch(client.store, poll_s=0.1, concurrency=2)
    reports: list[Report] = []
    runner = threading.Thread(
        target=lambda: reports.append(
            run_message(client.store, streamed, token, [rows[0].id], Recorder(), watch=watch)
        )
    )
    runner.start()
    wait_for(lambda: mock.state.calls == 1, what="the streamed call to start")
    client.cancel_batch(batch_id)
    runner.join(timeout=3)
    assert not runner.is_alive()
    assert reports[0].aborted == 1
    wait_for(lambda: "end" in mock.state.log[0], what="the mock to see the call end")
    assert mock.state.log[0]["outcome"] == "disconnected"
    assert states(client.store, batch_id) == {"long": "canceled"}


def test_under_gevent_a_cancel_aborts_a_silent_streamed_call(
    pg_url: str, mock: MockUpstream
) -> None:
    """As a worker runs it (gevent, the default 5 s poll, a cancel broadcast): the stream sends
    its first event and then nothing, so only killing its greenlet can end it; the upstream
    sees its connection close at once."""
    script = textwrap.dedent(
        f"""
        from gevent import monkey; monkey.patch_all()
        import time, gevent, requests
        from fusillade_celery.compat import patch_gevent_waits
        patch_gevent_waits()
        from fusillade_celery import cancel_watch
        from fusillade_celery.execute import execute
        from fusillade_celery.settings import Settings
        from fusillade_celery.submit import Client
        from fusillade_celery.upstream import get_session
        settings = Settings().replace(
            database_url={pg_url!r}, upstream_url={mock.url!r},
            stream_endpoints=frozenset({{"/v1/chat/completions"}}),
        )
        client = Client(settings)
        body = {{"model": "m1", "messages": [], "mock_stream_stall_ms": 20000}}
        line = {{"custom_id": "g", "method": "POST", "url": "/v1/chat/completions",
                 "body": body}}
        batch_id = client.submit_batch([line])
        token, rows = client.store.claim("m1", "m1", 10, 10, time.time())
        watch = cancel_watch.get_watch(client.store, 5.0, 4)
        run = gevent.spawn(
            execute, client.store, settings, get_session(), token, [r.id for r in rows],
            "w1", lambda *a: None, watch,
        )
        stats = {mock.url!r} + "/_mock/stats"
        while requests.get(stats, timeout=5).json()["calls"] < 1:
            gevent.sleep(0.01)
        gevent.sleep(0.2)  # the first event is in; the stream stalls
        t0 = time.monotonic()
        client.cancel_batch(batch_id)
        cancel_watch.cancel_now([batch_id])  # what the cancel broadcast does in a worker
        report = run.get(timeout=4)
        print(report.aborted, round(time.monotonic() - t0, 1) < 1.0)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "True"]
    wait_for(lambda: "end" in mock.state.log[0], what="the mock to see the call end")
    assert mock.state.log[0]["outcome"] == "disconnected"
