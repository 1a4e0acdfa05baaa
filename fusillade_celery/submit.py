"""The submit helper: how any app enqueues batches and reads them back.

``submit_batch`` validates the whole file while inserting it in one transaction, so a refused
file leaves nothing behind; then it nudges the claimer so the first upstream call does not wait
for the next beat tick.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import keyseal
from .db import get_engine
from .migrate import ensure_schema
from .output import batch_object, batch_status, result_line
from .processors import processor_paths
from .queues import queue_for_model
from .settings import Settings, parse_duration_s, redact_url, upstream_allowed
from .states import TERMINAL_BATCH, BatchStatus, RequestState
from .store import NotFound, Store
from .validation import ByteLines, InputError, Limits, ParsedLine, Source, parse_lines

log = logging.getLogger(__name__)
CHUNK = 5000
MAX_METADATA_PAIRS = 16
#: The longest batch upstream URL stored (``batches.upstream_url``).
MAX_UPSTREAM_URL = 2048


class _Hashing:
    """Passes a byte-line stream through while counting and hashing it (resume key)."""

    def __init__(self, lines: Any):
        self._lines = lines
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def __iter__(self) -> Iterator[bytes]:
        n = 0
        lines = iter(self._lines)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                # A text stream decodes as it is read: its bytes were not UTF-8.
                raise InputError(
                    f"not UTF-8 text ({exc.reason}; at or after this line)", line=n + 1
                ) from None
            n += 1
            if isinstance(line, str):
                line = line.encode("utf-8", "surrogateescape")
            self.sha256.update(line)
            self.bytes += len(line)
            yield line


def batch_upstream(url: str | None) -> str | None:
    """A batch's own upstream as it is stored (without a trailing slash), so whatever looks a
    batch up by it (the embedded resume) matches however the URL was typed."""
    return url.rstrip("/") if url else None


def _check_metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS:
        raise InputError(
            f"must be an object of at most {MAX_METADATA_PAIRS} pairs", field="metadata"
        )
    for key, value in metadata.items():
        if (
            not isinstance(key, str)
            or len(key) > 64
            or not isinstance(value, str)
            or len(value) > 512
        ):
            raise InputError(
                "keys are strings of at most 64 characters, values strings of at most 512",
                field="metadata",
            )
    return dict(metadata)


class Client:
    """Submit and read batches against one database, with explicit settings."""

    def __init__(self, settings: Settings, notify: bool = True):
        self.settings = settings
        self.store = Store(get_engine(settings.database_url, settings.db_pool_size))
        self.notify = notify and not settings.embedded
        ensure_schema(self.store.engine)
        # batch id -> (monotonic time counted, counts, batch was finished); see get_batch.
        self._counts: dict[str, tuple[float, dict[str, int], bool]] = {}

    # ------------------------------------------------------------------ submit

    def submit_batch(
        self,
        source: Source,
        *,
        endpoint: str | None = None,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        upstream: str | None = None,
        api_key: str | None = None,
        owner: str | None = None,
    ) -> str:
        """Validate and store ``source`` as a batch; return its id (``batch_...``).

        ``source`` is a path, a binary or text file object, or an iterable of dict lines.
        ``upstream``/``api_key`` override the model routes of the settings for this batch."""
        try:
            window_s = parse_duration_s(completion_window)
        except ValueError as exc:
            raise InputError(str(exc), field="completion_window") from None
        meta = _check_metadata(metadata)
        if upstream is not None and len(upstream) > MAX_UPSTREAM_URL:
            raise InputError(
                f"longer than {MAX_UPSTREAM_URL} characters ({len(upstream)})", field="upstream"
            )
        if upstream is not None and not upstream.startswith(("http://", "https://")):
            raise InputError(
                f"must be an http(s) URL, got {redact_url(upstream)!r}", field="upstream"
            )
        if upstream is not None and not upstream_allowed(upstream, self.settings.allowed_upstreams):
            raise InputError(
                f"{redact_url(upstream)!r} is not within FUSILLADE_ALLOWED_UPSTREAMS",
                field="upstream",
            )
        limits = Limits(self.settings.max_line_bytes, self.settings.max_file_bytes)
        name, stream, hasher = _open(source)
        now = time.time()
        file_id = "file-" + uuid.uuid4().hex
        batch_id = "batch_" + uuid.uuid4().hex
        models: dict[str, int] = {}
        state: dict[str, Any] = {"count": 0, "url": endpoint}

        def chunks() -> Iterator[list[dict[str, Any]]]:
            chunk: list[dict[str, Any]] = []
            for line in parse_lines(stream, limits, endpoint, processor_paths(self.settings)):
                self._check_model(line, models, upstream)
                state["count"] += 1
                state["url"] = line.url
                chunk.append(_template(file_id, line))
                if len(chunk) >= CHUNK:
                    yield chunk
                    chunk = []
            yield chunk

        batch_row = {
            "id": batch_id,
            "file_id": file_id,
            "endpoint": endpoint or "",  # the lines' own url, once read (make_batch)
            "completion_window": completion_window,
            # Whole seconds: the deadline the engine enforces is the ``expires_at`` the
            # Batch object shows (an integer), never up to a second after it; rounded up, so
            # the window is never shorter than the one asked for.
            "expires_at": float(math.ceil(now) + window_s),
            "metadata": json.dumps(meta) if meta is not None else None,
            "owner": owner,
            "upstream_url": batch_upstream(upstream),
            "upstream_api_key": keyseal.seal(api_key, self.settings.secret_key),
            "models": "[]",
            "total_requests": 0,
            "created_at": now,
        }

        def make_batch() -> tuple[dict[str, Any], dict[str, Any]]:
            batch_update = {
                "endpoint": state["url"],
                "models": json.dumps(sorted(models)),
                "total_requests": state["count"],
            }
            file_update: dict[str, Any] = {"bytes": hasher.bytes if hasher else 0}
            if hasher is not None:
                file_update["sha256"] = hasher.sha256.hexdigest()
            return batch_update, file_update

        file_row = {
            "id": file_id,
            "name": name,
            "purpose": "batch",
            "created_at": now,
            "owner": owner,
        }
        self.store.submit(file_row, batch_row, chunks(), make_batch)
        log.info(
            "batch %s submitted: %d requests, models %s", batch_id, state["count"], sorted(models)
        )
        if self.notify:
            self._nudge_claimer()
        return batch_id

    def _check_model(self, line: ParsedLine, models: dict[str, int], upstream: str | None) -> None:
        if line.model in models:
            return
        models[line.model] = line.line_number
        if upstream is None and self.settings.route_for(line.model) is None:
            raise InputError(
                f"unknown model {line.model!r}: no route for it and no default upstream "
                "(set FUSILLADE_UPSTREAM_URL or FUSILLADE_ROUTES, or pass an upstream)",
                line=line.line_number,
                field="body.model",
            )

    def _nudge_claimer(self) -> None:
        from .queues import CONTROL_QUEUE, direct_queue
        from .tasks import claim

        try:
            claim.apply_async(queue=direct_queue(CONTROL_QUEUE), expires=60, retry=False)
        except Exception as exc:  # the beat tick will claim; the batch is stored already
            log.warning("could not nudge the claimer (%s); beat will pick the batch up", exc)

    # ------------------------------------------------------------------ read

    def wait_batch(
        self,
        batch_id: str,
        timeout: float | None = None,
        poll_s: float = 0.5,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Block until the batch is finished (completed, failed, expired or cancelled) and
        return its Batch object; ``TimeoutError`` after ``timeout`` seconds (None: no limit).
        ``on_progress`` gets the Batch object of every poll (the CLI's progress bar)."""
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.get_batch(batch_id, counts_max_age_s=poll_s)
            if on_progress is not None:
                on_progress(batch)
            if BatchStatus(batch["status"]) in TERMINAL_BATCH:
                return batch
            if until is not None and time.monotonic() >= until:
                raise TimeoutError(
                    f"batch {batch_id} still {batch['status']} after {timeout} s "
                    f"({batch['request_counts']})"
                )
            time.sleep(poll_s if until is None else max(0.0, min(poll_s, until - time.monotonic())))

    def unserved_models(self, batch_id: str) -> list[str]:
        """Models of a running batch whose queue no live worker consumes (with a broker: the
        claimer leaves their requests pending until one starts). Empty when embedded."""
        row = self.store.get_batch_row(batch_id)
        if self.settings.embedded or batch_status(row) in TERMINAL_BATCH:
            return []
        alive_after = time.time() - self.settings.stale_worker_threshold_ms / 1000.0
        return [
            model
            for model in json.loads(row["models"])
            if not self.store.consumer_concurrency(queue_for_model(model), alive_after)
        ]

    def get_batch(self, batch_id: str, *, counts_max_age_s: float = 0.0) -> dict[str, Any]:
        """The OpenAI Batch object, with ``request_counts``.

        Status and timestamps are always read fresh. Counting is a scan of the batch's rows
        (about 1 us a row: 20 ms at 20,000, a second at 1,000,000), so a poller may accept
        counts up to ``counts_max_age_s`` old for a running batch (``status --watch`` and the
        progress bars use 0.5 s). A finished batch's counts never change: they are counted
        once after it ends and kept."""
        row = self.store.get_batch_row(batch_id)
        finished = batch_status(row) in TERMINAL_BATCH
        cached = self._counts.get(batch_id)
        now = time.monotonic()
        if cached is not None and (
            cached[2] or (not finished and now - cached[0] <= counts_max_age_s)
        ):
            counts = cached[1]
        else:
            counts = self.store.request_counts(batch_id)
            if finished or counts_max_age_s > 0:
                if len(self._counts) >= 1024:  # a long-lived client: forget the oldest
                    self._counts.pop(next(iter(self._counts)))
                self._counts[batch_id] = (now, counts, finished)
        return batch_object(row, counts)

    def list_batches(self, limit: int = 20) -> list[dict[str, Any]]:
        return [
            batch_object(row, self.store.request_counts(row["id"]))
            for row in self.store.list_batches(limit)
        ]

    def iter_results(self, batch_id: str, errors: bool = False) -> Iterator[dict[str, Any]]:
        """OpenAI output lines (or error lines), in input order, streamed; usable while the
        batch runs (partial results) and after expiry or cancel."""
        self.store.get_batch_row(batch_id)  # NotFound for unknown or deleted batches
        states = (
            [RequestState.FAILED, RequestState.CANCELED] if errors else [RequestState.COMPLETED]
        )
        for row in self.store.iter_result_rows(batch_id, states):
            yield result_line(row)

    def iter_file(self, file_id: str) -> Iterator[dict[str, Any]]:
        """The lines of a file: the input as stored, or a batch's output / error file."""
        row = self.store.get_file_row(file_id)
        if row["purpose"] == "batch":
            for t in self.store.iter_template_rows(file_id):
                yield {
                    "custom_id": t["custom_id"],
                    "method": t["method"],
                    "url": t["url"],
                    "body": json.loads(t["body"]),
                }
            return
        yield from self.iter_results(row["batch_id"], errors=row["purpose"] == "batch_error")

    def delete_batch(self, batch_id: str) -> None:
        """Soft delete (unfinished requests are cancelled first). The batch is no longer
        readable; the purge task erases its requests and responses in the background."""
        self.store.delete_batch(batch_id, time.time())
        self._announce_cancel(batch_id)

    def delete_file(self, file_id: str) -> None:
        """Soft delete an input file; its request bodies are purged once no batch uses them."""
        self.store.delete_file(file_id, time.time())

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """Stop the batch: nothing new starts; unfinished requests end ``canceled``; finished
        results stay readable. Returns the Batch object (``cancelling``, then ``cancelled``)."""
        self.store.cancel_batch(batch_id, time.time())
        self._announce_cancel(batch_id)
        return self.get_batch(batch_id)

    def _announce_cancel(self, batch_id: str) -> None:
        """With a broker: tell the workers now, so in-flight calls close within a second
        rather than at their next cancel poll (``control.py``)."""
        if self.notify:
            from .app import app
            from .control import announce_cancel

            announce_cancel(app, [batch_id])


def _template(file_id: str, line: ParsedLine) -> dict[str, Any]:
    return {
        "file_id": file_id,
        "line_number": line.line_number,
        "custom_id": line.custom_id,
        "method": line.method,
        "url": line.url,
        "body": line.body,
        "model": line.model,
        "body_bytes": line.body_bytes,
    }


def _open(source: Source) -> tuple[str, Any, _Hashing | None]:
    """(file name, stream for the parser, hasher or None for dict iterables)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise InputError(f"{path} is a directory, not a JSONL file")
        if not path.is_file():
            raise InputError(f"no such file: {path}")
        hasher = _Hashing(_Lines(path))
        return path.name, ByteLines(hasher), hasher
    if hasattr(source, "read"):
        hasher = _Hashing(source)
        name = os.path.basename(str(getattr(source, "name", "") or "upload.jsonl"))
        return name, ByteLines(hasher), hasher
    return "lines.jsonl", source, None


class _Lines:
    """Reopens the path on iteration so the file is closed when parsing ends."""

    def __init__(self, path: Path):
        self.path = path

    def __iter__(self) -> Iterator[bytes]:
        with self.path.open("rb") as fh:
            yield from fh


_default: dict[str, Client] = {}


def default_client() -> Client:
    """A client on the app's settings (env vars), created on first use."""
    from .app import get_settings

    settings = get_settings()
    client = _default.get("client")
    if client is None or client.settings is not settings:
        client = Client(settings)
        _default["client"] = client
    return client


def submit_batch(source: Source, **kwargs: Any) -> str:
    return default_client().submit_batch(source, **kwargs)


def get_batch(batch_id: str) -> dict[str, Any]:
    return default_client().get_batch(batch_id)


def wait_batch(batch_id: str, timeout: float | None = None) -> dict[str, Any]:
    return default_client().wait_batch(batch_id, timeout)


def iter_results(batch_id: str, errors: bool = False) -> Iterator[dict[str, Any]]:
    return default_client().iter_results(batch_id, errors=errors)


def cancel_batch(batch_id: str) -> dict[str, Any]:
    return default_client().cancel_batch(batch_id)


def iter_file(file_id: str) -> Iterator[dict[str, Any]]:
    return default_client().iter_file(file_id)


def delete_batch(batch_id: str) -> None:
    default_client().delete_batch(batch_id)


def delete_file(file_id: str) -> None:
    default_client().delete_file(file_id)


__all__ = [
    "Client",
    "InputError",
    "NotFound",
    "cancel_batch",
    "delete_batch",
    "delete_file",
    "get_batch",
    "iter_file",
    "iter_results",
    "submit_batch",
    "wait_batch",
]
