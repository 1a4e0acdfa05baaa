"""Server-side tools of the ``/v1/responses`` loop: an ``http`` tool call, and sibling calls
run at once.

A tool's failure is not the request's: whatever goes wrong (an error status, no answer, a
timeout) the model is given a short error output and may recover, as a person would retry or
apologise. Transient failures are retried a couple of times first, but a non-idempotent tool
only when the call surely did not reach it (it could not connect): a second call could repeat
its side effect. The tool's own error body never reaches the model or the output file, and
its key never reaches a log line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import requests
from urllib3.exceptions import NewConnectionError

from .. import upstream
from ..cancel_watch import gevent_active
from ..settings import redact_url
from ..toolconfig import Tool

if TYPE_CHECKING:
    from .base import Cancellation

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Pauses before the retries of a transient failure (so, three tries in all).
RETRY_DELAYS_S = (0.2, 0.5)
#: Statuses that mean "try again later" rather than "this call is wrong".
TRANSIENT_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))


@dataclass(frozen=True)
class ToolResult:
    """A tool call's output for the model (JSON text), its last HTTP status, and tries."""

    output: str
    status: int | None
    tries: int
    ok: bool


def _error(message: str) -> str:
    return json.dumps({"error": message})


def _success(text: str) -> str:
    """A 2xx body as the output: JSON as it came; other text wrapped as ``{"result": ...}``."""
    try:
        json.loads(text)
    except ValueError:
        return json.dumps({"result": text}, ensure_ascii=False)
    return text


def _never_reached(exc: requests.RequestException) -> bool:
    """Whether the call failed before the tool could have received it."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    seen: Any = exc
    for _ in range(8):  # requests wraps urllib3's MaxRetryError around the cause
        if isinstance(seen, NewConnectionError):
            return True
        if not isinstance(seen, BaseException):
            return False
        seen = getattr(seen, "reason", None) or seen.__cause__ or seen.__context__
    return False


def call_http(
    session: requests.Session,
    tool: Tool,
    arguments: str,
    headers: dict[str, str],
    cancel: Cancellation,
    sleep: Callable[[float], None] = time.sleep,
) -> ToolResult:
    """POST ``arguments`` (the model's JSON) to the tool, retrying transient failures, and
    return what the model is given. ``headers`` carry the request and call ids."""
    try:
        json.loads(arguments)
    except ValueError:
        return ToolResult(_error("the arguments are not valid JSON"), None, 0, False)
    sent = {**upstream.BASE_HEADERS, "Content-Type": "application/json", **headers}
    if tool.api_key:
        sent["Authorization"] = f"Bearer {tool.api_key}"
    timeout = tool.timeout_ms / 1000.0
    why = ""
    status: int | None = None
    tries = 0
    for delay in (*RETRY_DELAYS_S, None):
        cancel.check()
        tries += 1
        try:
            prepared = upstream.prepare(tool.url, sent, arguments)
            resp = session.send(
                prepared,
                timeout=(min(timeout, 30.0), timeout),
                proxies=upstream.proxies_for(tool.url),
            )
        except requests.RequestException as exc:
            status = None
            why = "timed out" if isinstance(exc, requests.Timeout) else "could not be reached"
            retry = tool.idempotent or _never_reached(exc)
            log.warning(
                "tool %s %s (try %d): %s", tool.name, why, tries, redact_url(type(exc).__name__)
            )
        else:
            status = resp.status_code
            if 200 <= status < 300:
                return ToolResult(_success(resp.text), status, tries, True)
            why = f"answered HTTP {status}"
            retry = tool.idempotent and status in TRANSIENT_STATUSES
            log.warning("tool %s %s (try %d)", tool.name, why, tries)
        if not retry or delay is None:
            break
        sleep(delay)
    return ToolResult(_error(f"the tool {tool.name} {why}"), status, tries, False)


def run_all(jobs: Sequence[Callable[[], T]], limit: int) -> list[T]:
    """Run ``jobs`` at most ``limit`` at a time; their results in order. The first failure
    is raised. Under gevent each job is a greenlet of the caller's and dies with it: a
    cancel kills the attempt's greenlet, and its sibling calls are killed too, so their
    connections close. With threads (no interrupting them) every job is waited for."""
    if len(jobs) == 1:
        return [jobs[0]()]
    size = max(1, min(limit, len(jobs)))
    if not gevent_active():
        with ThreadPoolExecutor(size, thread_name_prefix="fusillade-tool") as threads:
            futures = [threads.submit(job) for job in jobs]
            return [f.result() for f in futures]
    import gevent
    from gevent.pool import Pool

    pool = Pool(size)
    greenlets: list[Any] = []
    try:
        for job in jobs:
            greenlets.append(pool.spawn(_caught, job))
        gevent.joinall(greenlets)
    finally:
        for g in greenlets:
            if not g.dead:
                g.kill(block=False)
    results = [g.value for g in greenlets]
    for ok, value in results:
        if not ok:
            raise value
    return [value for _, value in results]


def _caught(job: Callable[[], T]) -> tuple[bool, Any]:
    """A greenlet's job with its exception returned, not raised: gevent prints the
    traceback of every greenlet that dies of one (a loop's ``_Stop``, a cancel's ``Aborted``
    are ordinary endings); the caller raises it."""
    try:
        return True, job()
    except Exception as exc:  # noqa: BLE001 - raised again by run_all, in the caller
        return False, exc
