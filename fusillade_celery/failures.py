"""Upstream failures made visible: each model's last failure recorded in ``model_errors`` and
a log line naming the model and the upstream host, both rate-limited per model and process.

Without them an unreachable upstream was invisible: rows went ``retrying`` and back, the
batch read ``in_progress`` and workers logged nothing at the default level. Only failed
attempts come here (a success pays nothing), and of those at most one per model every
``WRITE_EVERY_S`` costs a statement and one every ``LOG_EVERY_S`` a log line; the others are
counted in memory and reported with the next."""

from __future__ import annotations

import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine

from .settings import Settings, redact_url
from .states import ErrorKind
from .store import ModelError, Store, WorkItem
from .upstream import Outcome

#: Its own logger, so that its level can be set apart (``worker_logging``).
log = logging.getLogger("fusillade_celery.failures")

#: At most one ``model_errors`` write per model and process this often.
WRITE_EVERY_S = 5.0
#: At most one log line per model and process this often (with the count since the last).
LOG_EVERY_S = 10.0
#: Longest message kept: an HTTP error's body is a snippet, never the whole response.
MAX_MESSAGE = 200
#: Outcomes that are not the upstream's doing: the batch ended, not the call.
_NOT_UPSTREAM = frozenset({ErrorKind.BATCH_EXPIRED, ErrorKind.BATCH_CANCELLED})


def upstream_host(item: WorkItem, settings: Settings) -> str | None:
    """``host[:port]`` of the upstream an attempt of ``item`` goes to (the batch's own, else
    its routed model's route), without the URL's path or credentials; never the key."""
    url = item.upstream_url
    if not url:
        route = settings.route_for(item.routed_model) or settings.route_for(item.model)
        url = route.url if route is not None else None
    if not url:
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{parts.port}" if parts.port else host or None
    except ValueError:  # a port that is not a number: the request failed on it, say where
        return redact_url(url)[:MAX_MESSAGE]


#: The operating system's reason inside urllib3's "Max retries exceeded ... (Caused by
#: NewConnectionError(...: [Errno 111] Connection refused))", which 200 characters cut off.
_OS_REASON = re.compile(r"\[Errno -?\d+\][^'\")]*")


def short_message(detail: str, secrets: tuple[str, ...] = ()) -> str:
    """One line of at most ``MAX_MESSAGE`` characters, with ``secrets`` masked (the details
    already have keys removed by ``upstream._short``; this also covers a body echoing one).
    A connection error is said by its exception's name and the operating system's reason."""
    for secret in secrets:
        if secret:
            detail = detail.replace(secret, "***")
    text = re.sub(r"\s+", " ", detail).strip()
    reason = _OS_REASON.search(text) if "Max retries exceeded" in text else None
    if reason is not None:
        text = f"{text.split(':', 1)[0]}: {reason.group(0).strip()}"
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


@dataclass
class _Model:
    """What one (database, model) has seen since its last write and its last log line."""

    unwritten: int = 0
    unlogged: int = 0
    write_after: float = 0.0
    log_after: float = 0.0
    logged_at: float | None = None


class FailureLog:
    """The per-process, rate-limited reporter of failed attempts (``note``). Keyed by
    database and model, so tests on separate databases do not share a window."""

    def __init__(
        self,
        write_every_s: float = WRITE_EVERY_S,
        log_every_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.write_every_s = write_every_s
        self.log_every_s = log_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._models: dict[tuple[Engine, str], _Model] = {}

    def note(
        self, store: Store, settings: Settings, item: WorkItem, outcome: Outcome, at: float
    ) -> None:
        """Count a failed attempt of ``item``; write the model's last failure and log a line
        when their windows have passed. Never raises: this is bookkeeping, not the result."""
        kind = outcome.kind
        if kind is None or kind in _NOT_UPSTREAM:
            return
        now = self._clock()
        with self._lock:
            seen = self._models.setdefault((store.engine, item.routed_model), _Model())
            seen.unwritten += 1
            seen.unlogged += kind.retriable
            write = now >= seen.write_after
            if write:
                count, seen.unwritten = seen.unwritten, 0
                seen.write_after = now + self.write_every_s
            logged_at = seen.logged_at
            speak = kind.retriable and now >= seen.log_after
            if speak:
                failures, seen.unlogged = seen.unlogged, 0
                seen.log_after, seen.logged_at = now + self.log_every_s, now
        if not (write or speak):
            return
        host = upstream_host(item, settings)
        route = settings.route_for(item.routed_model)
        message = short_message(outcome.detail, (route.api_key if route else "",))
        if write:
            error = ModelError(
                item.routed_model, kind.value, outcome.status, message, host, at, count
            )
            try:
                store.record_model_error(error)
            except Exception as exc:  # noqa: BLE001 - the result is written elsewhere
                log.warning("could not record the last error of %s (%s)", item.routed_model, exc)
        if speak:
            since = "" if logged_at is None else f" in {now - logged_at:.0f} s"
            log.info(
                "model %s: %d retriable upstream failure%s%s at %s; last: %s %s",
                item.routed_model,
                failures,
                "" if failures == 1 else "s",
                since,
                host or "(no upstream)",
                kind.value,
                message,
            )


#: This process's reporter (``execute`` notes every failed attempt here).
FAILURES = FailureLog()


def worker_logging() -> None:
    """Let the failure lines through a worker left at Celery's default ``--loglevel``
    (WARNING): they are how an operator learns that an upstream fails, and come at most once
    per model every ``LOG_EVERY_S``. ``-l error`` (or a logging configuration that sets this
    logger's level) still silences them."""
    if log.level == logging.NOTSET and log.getEffectiveLevel() == logging.WARNING:
        log.setLevel(logging.INFO)
