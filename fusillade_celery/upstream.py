"""One upstream attempt: build the HTTP request, send it, classify what came back.

The session is per process and pooled to the worker's concurrency, so connections to the
upstream are reused across tasks (keep-alive) instead of a TCP handshake per request. The
environment's proxy and CA bundle variables are read once, when the process builds it
(``egress.Egress``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from requests.cookies import RequestsCookieJar
from requests.hooks import default_hooks
from requests.structures import CaseInsensitiveDict
from requests.utils import (
    check_header_validity,
    get_encoding_from_headers,
)

from . import keyseal, sse
from .egress import NO_PROXIES, Egress
from .settings import Settings, redact_url, upstream_allowed
from .states import ErrorKind
from .store import WorkItem

if TYPE_CHECKING:
    from .processors.base import Cancellation

log = logging.getLogger(__name__)

_session_lock = threading.Lock()
_shared: dict[int, requests.Session] = {}
MAX_ERROR_BODY = 4096


@dataclass(frozen=True)
class Outcome:
    """What one attempt produced. ``kind`` is None on success."""

    kind: ErrorKind | None
    status: int | None = None
    body: str | None = None
    detail: str = ""
    request_id: str | None = None
    #: Why, within ``kind``, when a kind has several causes (``response_loop_failed``).
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.kind is None

    def error(self) -> dict[str, Any]:
        err: dict[str, Any] = {
            "kind": self.kind.value if self.kind else None,
            "detail": self.detail,
        }
        if self.status is not None:
            err["status"] = self.status
        if self.reason is not None:
            err["reason"] = self.reason
        return err


class _Adapter(HTTPAdapter):
    """requests' adapter minus two per-request costs, through the two methods requests
    documents as the ones to override in a subclass. Together they were 8-9 % of a worker's
    CPU on an instant upstream.

    - The connection pool for a URL is looked up once per scheme, host and port (and proxy,
      if any) and kept (while urllib3 keeps it open), instead of rebuilding urllib3's pool key
      from the URL on every request.
    - The response is built without copying cookies into it: this session refuses cookies
      (get_session), so there is nothing to copy."""

    MAX_POOLS = 16  # requests' pool_connections: urllib3 keeps as many pools

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pools: dict[tuple[str, str, Any], Any] = {}

    def get_connection_with_tls_context(
        self, request: Any, verify: Any, proxies: Any = None, cert: Any = None
    ) -> Any:
        url = request.url or ""
        origin_end = url.find("/", url.find("//") + 2)
        origin = url if origin_end < 0 else url[:origin_end]
        if proxies:  # the pool of a proxied request is the proxy's (or a tunnel through it)
            # The proxies themselves, not select_proxy's pick: it parses the URL (5 us).
            key: tuple[Any, ...] = (origin, str(verify), cert, tuple(proxies.items()))
        else:
            key = (origin, str(verify), cert)
        pool = self._pools.get(key)
        if pool is None or pool.pool is None:  # unknown, or closed since
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            if len(self._pools) >= self.MAX_POOLS:
                self._pools.clear()
            self._pools[key] = pool
        return pool

    def close(self) -> None:
        self._pools.clear()
        super().close()

    def build_response(self, req: Any, resp: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


#: Connections kept per upstream host: the worker's ``-c`` once the worker has started
#: (``tasks.py`` records it), so every concurrent task can hold a kept-alive connection.
POOL_SIZE = {"size": 64}


class _Session(requests.Session):
    """A session whose redirects take the proxies the process read for their target, as
    requests would from the environment (its own ``rebuild_proxies`` keeps the first hop's
    when ``trust_env`` is off)."""

    def rebuild_proxies(self, prepared_request: Any, proxies: Any) -> dict[str, str]:
        egress = _egress
        target = NO_PROXIES if not egress.proxies else egress.proxies_for(prepared_request.url)
        return super().rebuild_proxies(prepared_request, target)


#: What the process's session was built with (get_session; until then, the environment at
#: import): read by every attempt.
_egress = Egress()


def get_session() -> requests.Session:
    """The process's shared session (requests.Session is safe for concurrent sends of
    independent requests; its adapter pool is what bounds connections per host). Building it
    reads the environment's proxies and CA bundle (``Egress``)."""
    global _egress
    pool_size = POOL_SIZE["size"]
    pid = os.getpid()
    session = _shared.get(pid)
    if session is None:
        with _session_lock:
            session = _shared.get(pid)
            if session is None:
                egress = Egress()
                session = _Session()
                adapter = _Adapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0)
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                session.trust_env = False
                session.verify = egress.verify
                # Requests of a batch are independent: no cookie is kept or sent back
                # (attempt() sends prepared requests, which would not carry them anyway).
                session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
                _egress = egress
                _shared[pid] = session
                described = egress.describe()
                if described:
                    log.info("%s", described)
                if egress.unusable:
                    log.error(
                        "unusable proxy %s; requests through it fail (retried) until it is "
                        "fixed and the worker restarted",
                        egress.unusable,
                    )
                if isinstance(egress.verify, str) and not os.path.exists(egress.verify):
                    log.warning(
                        "the CA bundle %s (%s) does not exist: HTTPS requests will fail",
                        egress.verify,
                        egress.ca_bundle_var,
                    )
    return session


def reset_session() -> None:
    """Close and forget this process's session: the next ``get_session`` builds a new one and
    reads the environment again (tests; a process that changed its proxy or CA variables)."""
    with _session_lock:
        session = _shared.pop(os.getpid(), None)
    if session is not None:
        session.close()


def header_value(value: Any) -> str:
    """Header-safe text: non-ASCII is percent-encoded rather than failing the request."""
    text = str(value)
    if text.isascii() and text.isprintable():
        return text
    return urllib.parse.quote(text, safe="")


#: What requests.Session would have merged in, minus its own User-Agent.
BASE_HEADERS = {
    "User-Agent": "fusillade-celery",
    "Accept": "*/*",
    "Accept-Encoding": "gzip, deflate",
}


def build_headers(item: WorkItem, api_key: str, settings: Settings) -> dict[str, str]:
    headers = {
        **BASE_HEADERS,
        "Content-Type": "application/json",
        "X-Fusillade-Request-Id": str(item.id),
        "X-Fusillade-Custom-Id": header_value(item.custom_id),
    }
    if api_key:
        # The key is the one user-supplied value sent as is: requests' own check rejects
        # CR/LF anywhere in it (http.client would pass a folded "\r\n\t..." line).
        check_header_validity(("Authorization", f"Bearer {api_key}"))
        headers["Authorization"] = f"Bearer {api_key}"
    for name in settings.batch_metadata_fields:
        value = item.batch_fields.get(name)
        if value is None:
            continue
        if name in ("created_at", "expires_at"):
            value = int(value)
        headers["x-fusillade-batch-" + name.replace("_", "-")] = header_value(value)
    return headers


class NotAllowed(ValueError):
    """A batch's own upstream is outside ``FUSILLADE_ALLOWED_UPSTREAMS`` of this worker."""


def resolve(item: WorkItem, settings: Settings) -> tuple[str | None, str, bool | None]:
    """(base URL, key, the route's ``stream``) for the item: the batch's own upstream wins;
    else the routed model's route. A batch-level URL never receives a key from settings (it
    may be another host), nor a route's stream flag.

    The worker checks a batch's own upstream against its own ``FUSILLADE_ALLOWED_UPSTREAMS``
    too: the submitter's environment may differ from the workers' (``NotAllowed``). A key
    stored sealed (``keyseal``) is opened here (``SealError`` when it cannot be)."""
    if item.upstream_url:
        if settings.allowed_upstreams and not upstream_allowed(
            item.upstream_url, settings.allowed_upstreams
        ):
            raise NotAllowed(
                f"the batch's upstream {redact_url(item.upstream_url)!r} is not within "
                "FUSILLADE_ALLOWED_UPSTREAMS of this worker"
            )
        key = keyseal.unseal(item.api_key, settings.secret_key) if item.api_key else ""
        return item.upstream_url.rstrip("/"), key or "", None
    route = settings.route_for(item.routed_model) or settings.route_for(item.model)
    if route is None:
        return None, "", None
    if item.api_key:  # the batch's own key, for the model's route
        return route.url, keyseal.unseal(item.api_key, settings.secret_key) or "", route.stream
    return route.url, route.api_key, route.stream


def escalated_body(item: WorkItem) -> str:
    """The body of a request routed to its SLA escalation model, naming that model: the
    escalation upstream serves the escalation model, and would refuse (or worse, serve) the
    original name. As fusillade does. Only escalated requests pay for the JSON round trip."""
    body = json.loads(item.body)
    body["model"] = item.routed_model
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def proxies_for(url: str) -> dict[str, str]:
    """The proxies this process sends a request to ``url`` through (none unless the
    environment named some when the session was built): for calls made beside ``attempt``,
    such as the ``/v1/responses`` loop's tool calls."""
    egress = _egress
    return NO_PROXIES if not egress.proxies else egress.proxies_for(url)


def classify_status(status: int, settings: Settings) -> ErrorKind | None:
    if status < 400:
        return None
    if status in settings.retry_statuses:
        return ErrorKind.RETRIABLE_HTTP_STATUS
    return ErrorKind.NON_RETRIABLE_HTTP_STATUS


def attempt(
    session: requests.Session,
    item: WorkItem,
    settings: Settings,
    cancel: Cancellation | None = None,
) -> Outcome:
    """Send one attempt and classify it (docs/architecture.md section 5 outcome table).
    Streamed when the path, the route or the body asks (``sse.streams``), then reassembled
    into the body a buffered call returns; ``cancel`` is checked between its reads.

    Nothing is sent at or after the batch's cutoff, ``expires_at`` minus
    ``stop_before_deadline``: a retry whose countdown ran late, or an attempt that waited for
    a slot past the deadline, ends ``batch_expired`` instead (invariant 5)."""
    if time.time() >= item.deadline - settings.stop_before_deadline_ms / 1000.0:
        return Outcome(ErrorKind.BATCH_EXPIRED, detail="batch expired before this attempt started")
    try:
        base, api_key, route_stream = resolve(item, settings)
    except (NotAllowed, keyseal.SealError) as exc:
        return Outcome(ErrorKind.BUILDER_ERROR, detail=str(exc))
    if base is None:
        return Outcome(
            ErrorKind.BUILDER_ERROR,
            detail=f"no upstream configured for model {item.routed_model!r}",
        )
    timeout = settings.timeout_ms / 1000.0
    egress = _egress
    try:
        # Renamed only for the escalation model's route: a batch's own upstream serves the
        # batch's model names, whatever queue and limit the escalation gave the request.
        escalated = item.routed_model != item.model and not item.upstream_url
        body = escalated_body(item) if escalated else item.body
        streamed = sse.streams(item.url, body, route_stream, settings.stream_endpoints)
        if streamed is not None:
            body = sse.with_stream(body, item.url, streamed)
        prepared = prepare(base + item.url, build_headers(item, api_key, settings), body)
        proxies = NO_PROXIES if not egress.proxies else egress.proxies_for(base)
        if streamed:
            sent = time.monotonic()
            read_s = sse.first_event_s(settings)
            resp = session.send(
                prepared, timeout=(min(timeout, 30.0), read_s), proxies=proxies, stream=True
            )
            try:
                body = sse.read(resp, item.url, settings, sent, cancel)
            except sse.ErrorEvent as exc:
                return _in_stream_error(exc, resp, settings)
        else:
            resp = session.send(prepared, timeout=(min(timeout, 30.0), timeout), proxies=proxies)
            body = resp.text
    except requests.Timeout as exc:
        return Outcome(ErrorKind.TIMEOUT, detail=_short(exc, api_key))
    except (
        requests.exceptions.InvalidURL,
        requests.exceptions.InvalidHeader,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema,
        ValueError,
    ) as exc:
        # With an unusable proxy (logged at start) the error is likely the proxy's: the
        # worker's setting, not the request's, so the request is retried, not failed.
        failed = ErrorKind.BUILDER_ERROR if egress.unusable is None else ErrorKind.NETWORK_ERROR
        return Outcome(failed, detail=_short(exc, api_key))
    except OSError as exc:
        # requests.RequestException, and the OSError requests raises when the CA bundle
        # named in the environment does not exist (a worker's setting: retried).
        return Outcome(ErrorKind.NETWORK_ERROR, detail=_short(exc, api_key))
    request_id = resp.headers.get("x-request-id")
    kind = classify_status(resp.status_code, settings)
    if kind is None:
        return Outcome(None, resp.status_code, body, request_id=request_id)
    return Outcome(
        kind,
        resp.status_code,
        body,
        detail=f"HTTP {resp.status_code}: {body[:MAX_ERROR_BODY]}",
        request_id=request_id,
    )


def _in_stream_error(exc: sse.ErrorEvent, resp: requests.Response, settings: Settings) -> Outcome:
    """An error object inside a 200 stream, classified by the status it stands for (one that
    names no error status counts as 500)."""
    status = exc.status if exc.status >= 400 else 500
    return Outcome(
        classify_status(status, settings) or ErrorKind.RETRIABLE_HTTP_STATUS,
        status,
        exc.body,
        detail=f"HTTP {status} in the stream: {exc.body[:MAX_ERROR_BODY]}",
        request_id=resp.headers.get("x-request-id"),
    )


#: The cookie jar of every prepared request: requests follows redirects through it, and it
#: refuses every cookie, so one jar serves all requests (Request.prepare built one each time).
NO_COOKIES = RequestsCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


@functools.lru_cache(maxsize=1024)
def checked_url(url: str) -> tuple[str, str | None]:
    """``url`` as requests would send it, validated (scheme, host; raises MissingSchema,
    InvalidURL), and the Basic ``Authorization`` that credentials in it stand for (requests
    sends ``user:pass@`` that way, in place of any other Authorization): once per distinct
    URL, not once per request."""
    p = requests.PreparedRequest()
    p.prepare_url(url, None)
    p.headers = CaseInsensitiveDict()
    p.prepare_auth(None, p.url)
    assert p.url is not None
    return p.url, p.headers.get("Authorization")


def prepare(url: str, headers: dict[str, str], body: str) -> requests.PreparedRequest:
    """The POST to send, built directly rather than by ``Request.prepare`` or
    ``Session.post``: those parse the URL again, build a cookie jar and merge session headers,
    cookies and environment settings on every call, which cost about as much CPU as the HTTP
    exchange itself. What they did that matters is kept: the URL is validated once
    (``checked_url``, with its credentials), header values that come from users are checked in
    ``build_headers``, and redirects are followed through a cookie jar that refuses cookies.
    The session has no headers of its own (BASE_HEADERS are sent instead) and reads the
    environment once (get_session, ``Egress``)."""
    data = body.encode("utf-8")
    p = requests.PreparedRequest()
    p.method = "POST"
    p.url, basic_auth = checked_url(url)
    p.headers = CaseInsensitiveDict(headers)
    if basic_auth is not None:
        p.headers["Authorization"] = basic_auth
    p.headers["Content-Length"] = str(len(data))
    p.body = data
    p.hooks = default_hooks()
    p._cookies = NO_COOKIES  # type: ignore[attr-defined]
    return p


def _short(exc: BaseException, api_key: str = "") -> str:
    """Exception text for the error record, with the key, URL and proxy credentials removed:
    http.client's "Invalid header value b'Bearer ...'" quotes the whole header, escaped; so
    are other messages."""
    # Credentials in the URL (user:pass@, sent as Basic auth) are quoted by InvalidURL and
    # connection errors alike.
    text = redact_url(f"{type(exc).__name__}: {exc}")
    for secret in _egress.secrets:  # a proxy's, however its URL was written
        text = text.replace(secret, "***")
    if api_key:
        for form in {api_key, repr(api_key)[1:-1], repr(api_key.encode())[2:-1]}:
            text = text.replace(form, "***")
    return text[:500]
