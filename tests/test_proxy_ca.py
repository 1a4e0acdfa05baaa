"""Egress proxies and private CAs: an attempt honours HTTP(S)_PROXY / ALL_PROXY / NO_PROXY and
REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE / SSL_CERT_FILE, read once per process, with real
sockets on 127.0.0.1: a forwarding proxy (absolute-URI POSTs and CONNECT tunnels) served by the
test in front of the project's mock upstream, and an HTTPS endpoint whose self-signed
certificate the test makes with the ``openssl`` CLI."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import select
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fusillade_celery import upstream
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.settings import Settings
from fusillade_celery.states import ErrorKind

from .conftest import line
from .unit.test_upstream import item

SETTINGS = Settings().replace(timeout_ms=5000)
PATH = "/v1/chat/completions"
CA_VARS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te"}


def send(base_url: str) -> upstream.Outcome:
    return upstream.attempt(upstream.get_session(), item(base_url), SETTINGS)


def basic(userinfo: str) -> str:
    return "Basic " + base64.b64encode(userinfo.encode()).decode()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No proxy or CA variable of the machine running the tests, and a session built from this
    test's environment (the session reads it once per process)."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name in CA_VARS or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)
    upstream.reset_session()
    yield
    upstream.reset_session()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.seen: list[tuple[str, str, str | None]] = []  # (method, target, Proxy-Authorization)
        self.connections = 0
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def __enter__(self) -> Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


class ProxyHandler(Handler):
    """A forwarding proxy: an absolute-URI request is sent on to its host, a CONNECT becomes a
    tunnel. A request that is not for a proxy (a relative target) is refused."""

    def do_POST(self) -> None:
        self.server.seen.append(("POST", self.path, self.headers.get("Proxy-Authorization")))
        body = self.body()
        target = urllib.parse.urlsplit(self.path)
        if not target.hostname:
            self.reply(400, b"not a proxy request")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
        try:
            conn.request("POST", target.path, body, headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        skip = HOP_BY_HOP | {"content-length", "transfer-encoding"}
        self.reply(
            resp.status, data, [(k, v) for k, v in resp.getheaders() if k.lower() not in skip]
        )

    def do_CONNECT(self) -> None:
        self.server.seen.append(("CONNECT", self.path, self.headers.get("Proxy-Authorization")))
        host, _, port = self.path.rpartition(":")
        tunnel = socket.create_connection((host, int(port)), timeout=10)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        ends = [self.connection, tunnel]
        try:
            while True:
                readable, _, _ = select.select(ends, [], [], 10)
                if not readable:
                    return
                for end in readable:
                    data = end.recv(65536)
                    if not data:
                        return
                    (tunnel if end is self.connection else self.connection).sendall(data)
        finally:
            tunnel.close()


class CompletionHandler(Handler):
    """A minimal OpenAI-compatible upstream: every POST gets a chat completion."""

    def do_POST(self) -> None:
        self.server.seen.append(("POST", self.path, self.headers.get("Proxy-Authorization")))
        self.body()
        completion = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "m1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        }
        self.reply(200, json.dumps(completion).encode(), [("Content-Type", "application/json")])


class RedirectHandler(Handler):
    """Sends every POST on to ``self.server.location`` (307 keeps the method and body)."""

    def do_POST(self) -> None:
        self.server.seen.append(("POST", self.path, None))
        self.body()
        self.reply(307, b"", [("Location", self.server.location + self.path)])  # type: ignore[attr-defined]


@pytest.fixture
def proxy() -> Iterator[Server]:
    with Server(ProxyHandler) as server:
        yield server


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- proxies -------------------------------------------------------------------------------


@pytest.mark.parametrize("var", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_an_attempt_goes_through_the_proxy_of_the_environment(
    monkeypatch: pytest.MonkeyPatch, proxy: Server, mock: MockUpstream, var: str
) -> None:
    monkeypatch.setenv(var, f"http://user:s3cret@127.0.0.1:{proxy.port}")
    for _ in range(2):
        out = send(mock.url)
        assert out.ok and out.status == 200, out
        assert json.loads(out.body or "")["object"] == "chat.completion"
    assert proxy.seen == 2 * [("POST", mock.url + PATH, basic("user:s3cret"))]
    assert mock.state.calls == 2
    assert proxy.connections == 1  # the proxy's connection is kept alive


@pytest.mark.parametrize(
    "no_proxy, direct",
    [
        ("127.0.0.1", True),
        ("127.0.0.0/8", True),
        ("*", True),
        ("example.com, 127.0.0.1", True),
        ("127.0.0.1:{port}", True),
        ("127.0.0.1:1", False),
        ("example.com,.internal", False),
    ],
)
@pytest.mark.parametrize("var", ["NO_PROXY", "no_proxy"])
def test_no_proxy_sends_the_hosts_it_covers_direct(
    monkeypatch: pytest.MonkeyPatch,
    proxy: Server,
    mock: MockUpstream,
    var: str,
    no_proxy: str,
    direct: bool,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv(var, no_proxy.format(port=mock.port))
    out = send(mock.url)
    assert out.ok and out.status == 200, out
    assert mock.state.calls == 1
    assert len(proxy.seen) == (0 if direct else 1)


def test_the_environment_is_read_once_per_process(
    monkeypatch: pytest.MonkeyPatch, proxy: Server, mock: MockUpstream
) -> None:
    assert send(mock.url).ok
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    assert send(mock.url).ok
    assert proxy.seen == []  # the session was built before the variable was set
    upstream.reset_session()
    assert send(mock.url).ok
    assert len(proxy.seen) == 1 and mock.state.calls == 3


def test_a_redirect_to_a_host_no_proxy_covers_leaves_the_proxy(
    monkeypatch: pytest.MonkeyPatch, proxy: Server
) -> None:
    """requests applies the environment to a redirect's target anew; so does the session."""
    with Server(CompletionHandler) as target, Server(RedirectHandler) as redirector:
        redirector.location = f"http://127.0.0.1:{target.port}"  # type: ignore[attr-defined]
        monkeypatch.setenv("HTTP_PROXY", f"http://u:s3cret@127.0.0.1:{proxy.port}")
        monkeypatch.setenv("NO_PROXY", f"127.0.0.1:{target.port}")
        first = f"http://127.0.0.1:{redirector.port}"
        out = send(first)
        assert out.ok and out.status == 200, out
        assert proxy.seen == [("POST", first + PATH, basic("u:s3cret"))]
        assert redirector.seen == [("POST", PATH, None)]
        # Direct (a relative target, not a proxy's absolute one), without proxy credentials.
        assert target.seen == [("POST", PATH, None)]


def test_the_pool_of_an_origin_is_kept_per_proxy(proxy: Server, mock: MockUpstream) -> None:
    """The adapter keeps one pool per origin; a request to the same origin through another
    proxy (or none) does not take the pool of the first."""
    session = upstream.get_session()
    through = {"http": f"http://127.0.0.1:{proxy.port}"}
    for proxies, seen in [(through, 1), (upstream.NO_PROXIES, 1), (through, 2)]:
        body = json.dumps(line("c1")["body"])
        prepared = upstream.prepare(mock.url + PATH, dict(upstream.BASE_HEADERS), body)
        assert session.send(prepared, timeout=5, proxies=proxies).status_code == 200
        assert len(proxy.seen) == seen
    assert mock.state.calls == 3


@pytest.mark.parametrize(
    "proxy_url, usable",
    [
        ("http://user:s3cret@127.0.0.1:{port}", True),  # nobody answers
        ("user:s3cret@127.0.0.1:{port}", False),  # no scheme: requests finds no host
        ("http://s3cret@127.0.0.1:99999", False),  # a token as the user; no such port
    ],
)
def test_proxy_credentials_reach_neither_the_log_nor_the_error_record(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mock: MockUpstream,
    proxy_url: str,
    usable: bool,
) -> None:
    """A proxy that cannot carry the request makes a (retried) network error, never a direct
    request nor a builder error; an unusable one is reported once, at start."""
    port = closed_port()
    monkeypatch.setenv("HTTP_PROXY", proxy_url.format(port=port))
    caplog.set_level(logging.INFO, logger="fusillade_celery.upstream")
    out = send(mock.url)
    assert out.kind is ErrorKind.NETWORK_ERROR, out
    assert mock.state.calls == 0
    logged = caplog.text
    assert "***@127.0.0.1:" in logged
    assert ("unusable proxy" in logged) is not usable
    for text in (logged, out.detail):
        assert "s3cret" not in text and "user:" not in text


# --- CA bundles ----------------------------------------------------------------------------


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("install the openssl CLI (Debian: apt-get install openssl): it makes certs")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key)]
        + ["-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The HTTPS upstream's certificate ("good"; it is its own CA) and an unrelated one."""
    directory = tmp_path_factory.mktemp("certs")
    good, key = self_signed(directory, "good")
    other, _ = self_signed(directory, "other")
    return {"good": good, "key": key, "other": other}


@pytest.fixture
def https_upstream(certs: dict[str, Path]) -> Iterator[Server]:
    server = Server(CompletionHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["good"], certs["key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with server:
        yield server


def https_url(server: Server) -> str:
    return f"https://127.0.0.1:{server.port}"


def test_a_private_ca_is_not_trusted_without_a_bundle_variable(https_upstream: Server) -> None:
    out = send(https_url(https_upstream))
    assert out.kind is ErrorKind.NETWORK_ERROR, out
    assert "SSLError" in out.detail and "CERTIFICATE_VERIFY_FAILED" in out.detail
    assert https_upstream.seen == []


@pytest.mark.parametrize("var", CA_VARS)
def test_an_attempt_trusts_the_ca_bundle_of_the_environment(
    monkeypatch: pytest.MonkeyPatch, certs: dict[str, Path], https_upstream: Server, var: str
) -> None:
    monkeypatch.setenv(var, str(certs["good"]))
    out = send(https_url(https_upstream))
    assert out.ok and out.status == 200, out
    assert json.loads(out.body or "")["object"] == "chat.completion"
    assert https_upstream.seen == [("POST", PATH, None)]
    assert upstream.get_session().verify == str(certs["good"])


@pytest.mark.parametrize(
    "env, trusted",
    [
        ({"REQUESTS_CA_BUNDLE": "other", "CURL_CA_BUNDLE": "good"}, False),
        ({"REQUESTS_CA_BUNDLE": "other", "SSL_CERT_FILE": "good"}, False),
        ({"CURL_CA_BUNDLE": "other", "SSL_CERT_FILE": "good"}, False),
        ({"REQUESTS_CA_BUNDLE": "", "CURL_CA_BUNDLE": "", "SSL_CERT_FILE": "good"}, True),
    ],
)
def test_the_first_bundle_variable_set_wins(
    monkeypatch: pytest.MonkeyPatch,
    certs: dict[str, Path],
    https_upstream: Server,
    env: dict[str, str],
    trusted: bool,
) -> None:
    """REQUESTS_CA_BUNDLE, then CURL_CA_BUNDLE (as requests reads them), then SSL_CERT_FILE;
    an empty one counts as unset."""
    for var, which in env.items():
        monkeypatch.setenv(var, str(certs[which]) if which else "")
    out = send(https_url(https_upstream))
    assert out.ok is trusted, out
    if not trusted:
        assert "CERTIFICATE_VERIFY_FAILED" in out.detail


def test_a_missing_bundle_is_a_network_error_and_a_warning(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    https_upstream: Server,
) -> None:
    """The bundle is the worker's setting: every HTTPS attempt fails (retried) with a detail
    that names it, rather than an exception out of the attempt."""
    missing = str(tmp_path / "missing.pem")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", missing)
    out = send(https_url(https_upstream))
    assert out.kind is ErrorKind.NETWORK_ERROR, out
    assert missing in out.detail
    assert f"the CA bundle {missing} (REQUESTS_CA_BUNDLE) does not exist" in caplog.text


def test_https_goes_through_the_proxy_in_a_tunnel(
    monkeypatch: pytest.MonkeyPatch, certs: dict[str, Path], proxy: Server, https_upstream: Server
) -> None:
    """HTTPS_PROXY and a private CA together, the usual egress setup: a CONNECT tunnel
    carrying the proxy's credentials, TLS to the upstream inside it."""
    monkeypatch.setenv("HTTPS_PROXY", f"http://user:s3cret@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # not for https URLs
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["good"]))
    for _ in range(2):
        out = send(https_url(https_upstream))
        assert out.ok and out.status == 200, out
    assert proxy.seen == [("CONNECT", f"127.0.0.1:{https_upstream.port}", basic("user:s3cret"))]
    assert https_upstream.seen == 2 * [("POST", PATH, None)]
