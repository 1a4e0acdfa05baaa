"""One attempt against the project's mock upstream: what is sent, and bad targets or headers
classified as builder errors (never raised into the task)."""

from __future__ import annotations

import json
import time

import pytest

from fusillade_celery import upstream
from fusillade_celery.mock_upstream import MockConfig, MockUpstream
from fusillade_celery.settings import Settings
from fusillade_celery.states import ErrorKind
from fusillade_celery.store import WorkItem


def item(upstream_url: str | None, api_key: str | None = "sk-x", custom_id: str = "c1") -> WorkItem:
    return WorkItem(
        id=7,
        token="t" * 32,
        custom_id=custom_id,
        batch_id="batch_1",
        model="m1",
        routed_model="m1",
        attempt=0,
        deadline=time.time() + 3600,
        url="/v1/chat/completions",
        body=json.dumps({"model": "m1", "messages": [{"role": "user", "content": "héllo"}]}),
        upstream_url=upstream_url,
        api_key=api_key,
        batch_fields={"id": "batch_1"},
    )


@pytest.fixture(scope="module")
def mock_url() -> str:  # type: ignore[misc]
    with MockUpstream(MockConfig()) as m:
        yield m.url


def test_attempt_sends_the_body_and_headers_and_reads_the_reply(mock_url: str) -> None:
    session = upstream.get_session()
    out = upstream.attempt(session, item(mock_url, custom_id="cid ü"), Settings())
    assert out.ok and out.status == 200
    assert json.loads(out.body or "")["object"] == "chat.completion"
    call = upstream.requests.get(mock_url + "/_mock/stats", timeout=5).json()["log"][-1]
    assert call["headers"]["authorization"] == "Bearer sk-x"
    assert call["headers"]["x-fusillade-request-id"] == "7"
    assert call["headers"]["x-fusillade-custom-id"] == "cid%20%C3%BC"


@pytest.mark.parametrize(
    "target, api_key",
    [
        ("127.0.0.1:9", "k"),  # no scheme
        ("http://", "k"),  # no host
        ("ftp://127.0.0.1:9", "k"),  # no adapter for the scheme
        ("http://127.0.0.1:99999", "k"),  # port out of range
        ("MOCK", "sk-bad\r\nx-injected: 1"),  # a key that would split the header
        ("MOCK", "sk-bad\r\n\tx-folded: 1"),  # ... or fold it (http.client lets that pass)
        ("MOCK", "sk-bad\nx"),
    ],
)
def test_unusable_targets_and_headers_are_builder_errors(
    mock_url: str, target: str, api_key: str
) -> None:
    url = mock_url if target == "MOCK" else target
    out = upstream.attempt(upstream.get_session(), item(url, api_key), Settings())
    assert out.kind is ErrorKind.BUILDER_ERROR, out
    assert "sk-bad" not in out.detail  # the error record never quotes the key


@pytest.mark.parametrize(
    "url", ["http://u:sk-secret@127.0.0.1:99999", "http://u:sk-secret@127.0.0.1:9"]
)
def test_credentials_in_an_upstream_url_never_reach_the_error_record(url: str) -> None:
    """A malformed URL (builder error) or one nobody answers (network error): the message
    quotes the URL, but not its password."""
    out = upstream.attempt(
        upstream.get_session(), item(url, None), Settings().replace(timeout_ms=2000)
    )
    assert out.kind in (ErrorKind.BUILDER_ERROR, ErrorKind.NETWORK_ERROR), out
    assert "sk-secret" not in out.detail
    if out.kind is ErrorKind.BUILDER_ERROR:  # InvalidURL quotes the URL, masked
        assert "http://u:***@127.0.0.1:99999" in out.detail


def test_the_adapter_keeps_one_pool_per_origin_until_closed(mock_url: str) -> None:
    session = upstream.get_session()
    adapter = session.get_adapter(mock_url)
    for _ in range(3):
        assert upstream.attempt(session, item(mock_url), Settings()).ok
    kept = [k for k in adapter._pools if k[0] == mock_url]
    assert len(kept) == 1  # one lookup per origin, not per request
    first = adapter._pools[kept[0]]
    adapter.close()  # what Session.close does: the kept pools go with the manager's
    out = upstream.attempt(session, item(mock_url), Settings())
    assert out.ok and (out.request_id or "").startswith("mock-")
    assert adapter._pools[kept[0]] is not first


@pytest.mark.parametrize("status", [307, 308])
def test_redirects_are_followed_with_the_body(mock_url: str, status: int) -> None:
    """An upstream behind a redirect (a moved path, http to https) answers as before."""
    import http.server
    import threading

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            self.send_header("Location", mock_url + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        out = upstream.attempt(upstream.get_session(), item(url), Settings())
        assert out.ok and out.status == 200, out
        assert json.loads(out.body or "")["object"] == "chat.completion"
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_in_the_upstream_url_are_sent_as_basic_auth(mock_url: str) -> None:
    url = mock_url.replace("http://", "http://user:pa%20ss@")
    out = upstream.attempt(upstream.get_session(), item(url, api_key=None), Settings())
    assert out.ok, out
    call = upstream.requests.get(mock_url + "/_mock/stats", timeout=5).json()["log"][-1]
    assert call["headers"]["authorization"] == "Basic dXNlcjpwYSBzcw=="  # user:pa ss
