"""Streamed attempts against the project's mock upstream over HTTP: the reassembled body is
the buffered one, in every format; in-stream errors, cut, truncated and empty streams and
the three timeouts are classified; the connection is kept after a complete stream and closed
after a broken one; a cancel seen between reads ends the call."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fusillade_celery import upstream
from fusillade_celery.cancel_watch import Aborted
from fusillade_celery.mock_upstream import MockConfig, MockUpstream
from fusillade_celery.settings import Settings
from fusillade_celery.states import ErrorKind
from fusillade_celery.store import WorkItem

CHAT, TEXT, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
STREAMED = Settings(stream_endpoints=frozenset({CHAT, TEXT, RESPONSES}))


def item(base: str, path: str = CHAT, custom_id: str = "s1", **body: Any) -> WorkItem:
    content: dict[str, Any] = {"model": "m1", **body}
    if path == CHAT:
        content.setdefault("messages", [{"role": "user", "content": "hi"}])
    else:
        content.setdefault("prompt" if path == TEXT else "input", "hi")
    return WorkItem(
        id=9,
        token="t" * 32,
        custom_id=custom_id,
        batch_id="batch_s",
        model="m1",
        routed_model="m1",
        attempt=0,
        deadline=time.time() + 3600,
        url=path,
        body=json.dumps(content, separators=(",", ":")),
        upstream_url=base,
        api_key=None,
        batch_fields={},
    )


@pytest.fixture(scope="module")
def mock() -> Iterator[MockUpstream]:
    with MockUpstream(MockConfig()) as m:
        yield m


@pytest.fixture(autouse=True)
def fresh(mock: MockUpstream) -> None:
    mock.state.reset()  # every test's calls are call 1 of their custom_ids


def attempt(it: WorkItem, settings: Settings = STREAMED, cancel: Any = None) -> upstream.Outcome:
    return upstream.attempt(upstream.get_session(), it, settings, cancel)


VARIANTS = {
    "plain": {},
    "logprobs-n2": {"logprobs": True, "n": 2},
    "tools": {"mock_tool_calls": [{"name": "lookup", "arguments": {"q": "a longer query"}}]},
    "refusal": {"mock_refusal": "I will not do that."},
}


@pytest.mark.parametrize(
    ("path", "variant"),
    [(CHAT, v) for v in VARIANTS] + [(TEXT, "plain"), (TEXT, "logprobs-n2"), (RESPONSES, "plain")],
)
def test_a_streamed_call_gives_the_body_of_a_buffered_one(
    mock: MockUpstream, path: str, variant: str
) -> None:
    buffered = attempt(item(mock.url, path, **VARIANTS[variant]), Settings())
    mock.state.reset()
    streamed = attempt(item(mock.url, path, **VARIANTS[variant]))
    assert buffered.ok and streamed.ok, (buffered, streamed)
    assert json.loads(streamed.body or "") == json.loads(buffered.body or "")
    assert streamed.request_id == "mock-1"
    assert mock.state.log[-1].get("stream") is True  # it was streamed


def test_a_body_asking_for_a_stream_is_reassembled_and_usage_is_asked_for(
    mock: MockUpstream,
) -> None:
    """Before, the raw event text was stored as the body."""
    out = attempt(item(mock.url, stream=True, stream_options={"x": 1}), Settings())
    assert out.ok and json.loads(out.body or "")["object"] == "chat.completion"
    assert json.loads(out.body or "")["usage"]["total_tokens"] == 12


def test_a_json_reply_to_a_streamed_request_passes_through(mock: MockUpstream) -> None:
    buffered = attempt(item(mock.url, custom_id="j"), Settings())
    mock.state.reset()
    out = attempt(item(mock.url, custom_id="j", mock_stream_json=True))
    assert out.ok and out.body == buffered.body


def test_an_error_reply_that_is_not_a_stream_keeps_its_body(mock: MockUpstream) -> None:
    out = attempt(item(mock.url, mock_statuses=[503]))
    assert (out.kind, out.status) == (ErrorKind.RETRIABLE_HTTP_STATUS, 503)
    assert json.loads(out.body or "")["error"]["code"] == 503


@pytest.mark.parametrize(
    ("path", "control", "kind", "status", "detail"),
    [
        (CHAT, {"mock_stream_error": 400}, ErrorKind.NON_RETRIABLE_HTTP_STATUS, 400, "HTTP 400"),
        (CHAT, {"mock_stream_error": 503}, ErrorKind.RETRIABLE_HTTP_STATUS, 503, "HTTP 503"),
        (RESPONSES, {"mock_stream_error": 429}, ErrorKind.RETRIABLE_HTTP_STATUS, 429, "HTTP 429"),
        (RESPONSES, {"mock_stream_error": 400}, ErrorKind.NON_RETRIABLE_HTTP_STATUS, 400, "400"),
        (CHAT, {"mock_stream_truncate": True}, ErrorKind.NETWORK_ERROR, None, "before [DONE]"),
        (RESPONSES, {"mock_stream_truncate": True}, ErrorKind.NETWORK_ERROR, None, "completed"),
        (TEXT, {"mock_stream_empty": True}, ErrorKind.NETWORK_ERROR, None, "empty stream"),
        (CHAT, {"mock_stream_fail_after": 2}, ErrorKind.NETWORK_ERROR, None, "broke after 2"),
    ],
)
def test_stream_failures_are_classified(
    mock: MockUpstream,
    path: str,
    control: dict[str, Any],
    kind: ErrorKind,
    status: int | None,
    detail: str,
) -> None:
    out = attempt(item(mock.url, path, **control))
    assert (out.kind, out.status) == (kind, status), out
    assert detail in out.detail
    if status is not None:  # the error as the upstream sent it
        assert "mock error" in (out.body or "")


@pytest.mark.parametrize(
    ("control", "timeouts"),
    [
        # headers at once, then nothing: the first-event timeout
        ({"mock_stream_stall_ms": 3000, "mock_stream_stall_at": 0}, {"first_event": 400}),
        # no reply at all: the same timeout, on the headers
        ({"mock_stall_ms": 3000}, {"first_event": 400}),
        # comments every 50 ms are not events: the idle timeout still ends it
        ({"mock_stream_stall_ms": 3000, "mock_stream_keepalive_ms": 50}, {"idle": 400}),
        # an event every 150 ms never idles, but the whole stream outlasts its total
        ({"mock_stream_event_ms": 150}, {"idle": 1000, "total": 700}),
    ],
    ids=["first-event", "first-event-headers", "idle-with-comments", "total"],
)
def test_the_three_timeouts(
    mock: MockUpstream, control: dict[str, Any], timeouts: dict[str, int]
) -> None:
    settings = STREAMED.replace(**{f"stream_{k}_timeout_ms": v for k, v in timeouts.items()})
    expected = min(timeouts.get("first_event", 10**6), timeouts.get("total", 10**6)) / 1000.0
    if "idle" in timeouts and "total" not in timeouts:
        expected = timeouts["idle"] / 1000.0
    start = time.monotonic()
    out = attempt(item(mock.url, **control), settings)
    took = time.monotonic() - start
    assert out.kind is ErrorKind.TIMEOUT, out
    assert expected - 0.05 <= took <= expected + 1.0, took


def test_the_connection_is_kept_after_a_complete_stream_and_closed_after_a_broken_one(
    mock: MockUpstream,
) -> None:
    for i in range(3):
        assert attempt(item(mock.url, custom_id=f"k{i}")).ok
    # a stream read to its end, even without its terminal event, leaves a usable connection
    assert not attempt(item(mock.url, custom_id="t", mock_stream_truncate=True)).ok
    assert not attempt(item(mock.url, custom_id="e", mock_stream_error=503)).ok
    # one abandoned mid-stream is closed: the upstream sees it go
    idle = STREAMED.replace(stream_idle_timeout_ms=300)
    assert not attempt(item(mock.url, custom_id="s", mock_stream_stall_ms=2000), idle).ok
    assert attempt(item(mock.url, custom_id="after")).ok
    ports = [e["port"] for e in mock.state.log]
    assert len(set(ports[:6])) == 1 and ports[6] != ports[0], ports
    wait_disconnected(mock.state.log[5])


class Flag:
    """A cancellation handle that turns cancelled when set."""

    def __init__(self) -> None:
        self.event = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def check(self) -> None:
        if self.cancelled:
            raise Aborted("batch_s")


def test_a_cancel_seen_between_reads_ends_the_call_and_closes_its_connection(
    mock: MockUpstream,
) -> None:
    """Without gevent nothing can interrupt a read, but a stream still sending (here a
    keep-alive comment every 50 ms) is left at the next read after the cancel."""
    cancel = Flag()
    timer = threading.Timer(0.3, cancel.event.set)
    timer.start()
    start = time.monotonic()
    with pytest.raises(Aborted):
        attempt(
            item(mock.url, mock_stream_stall_ms=5000, mock_stream_keepalive_ms=50),
            cancel=cancel,
        )
    assert time.monotonic() - start < 1.0
    wait_disconnected(mock.state.log[0])


def wait_disconnected(call: dict[str, Any]) -> None:
    """The mock saw the client close this call before its reply ended."""
    wait = time.monotonic() + 5
    while "end" not in call and time.monotonic() < wait:
        time.sleep(0.02)
    assert call.get("outcome") == "disconnected", call
