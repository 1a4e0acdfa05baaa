"""The submit helper: how any app enqueues batches and reads them back.

``submit_batch`` validates the whole file while inserting it in one transaction, so a refused
file leaves nothing behind; then it nudges the claimer so the first upstream call does not wait
for the next beat tick.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import keyseal
from .db import get_engine
from .intake import (
    CHUNK,
    UploadDetails,
    batch_upstream,
    check_metadata,
    deadline,
    file_summary,
    finish_stamp,
    new_batch_id,
    new_file_id,
    open_source,
    result_file_rows,
    template_row,
    window_seconds,
)
from .migrate import ensure_schema
from .output import batch_object, batch_status, file_object, result_line
from .processors import processor_paths
from .queues import queue_for_model
from .settings import Settings, redact_url, upstream_allowed
from .states import TERMINAL_BATCH, BatchStatus, RequestState
from .store import NotFound, Store
from .validation import ByteLines, InputError, Limits, ParsedLine, Source, parse_lines

log = logging.getLogger(__name__)
#: The longest batch upstream URL stored (``batches.upstream_url``).
MAX_UPSTREAM_URL = 2048


class Client:
    """Submit and read batches against one database, with explicit settings.

    Every read and change takes an ``owner``: given, only that owner's batches and files
    exist for the call (NotFound otherwise: the HTTP API's tenancy); None, any owner's (the
    CLI, an operator)."""

    def __init__(self, settings: Settings, notify: bool = True, pre_ping: bool = True):
        self.settings = settings
        # pre_ping: a round trip per checkout; the HTTP API turns it off (its reads retry
        # on a dropped connection, and a poll's checkouts were a third of its time).
        self.store = Store(get_engine(settings.database_url, settings.db_pool_size, pre_ping))
        self.notify = notify and not settings.embedded
        ensure_schema(self.store.engine)
        # batch id -> (monotonic time counted, counts, the batch's finish stamps or None
        # while it runs); see get_batch.
        self._counts: dict[str, tuple[float, dict[str, int], tuple[Any, ...] | None]] = {}

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
        ``upstream``/``api_key`` override the model routes of the settings for this batch.
        ``owner``: the API key name whose callers may see the batch (None: no key's)."""
        window_s = window_seconds(completion_window)
        meta = check_metadata(metadata)
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
        name, stream, hasher = open_source(source)
        now = time.time()
        file_id = new_file_id()
        batch_id = new_batch_id()
        models: dict[str, int] = {}
        state: dict[str, Any] = {"count": 0, "url": endpoint}
        results = result_file_rows(batch_id, owner, now)
        batch_row = {
            "id": batch_id,
            "file_id": file_id,
            "endpoint": endpoint or "",  # the lines' own url, once read (make_batch)
            "completion_window": completion_window,
            "expires_at": deadline(now, window_s),
            "metadata": json.dumps(meta) if meta is not None else None,
            "owner": owner,
            "upstream_url": batch_upstream(upstream),
            "upstream_api_key": keyseal.seal(api_key, self.settings.secret_key),
            "models": "[]",
            "total_requests": 0,
            "created_at": now,
            "output_file_id": results[0]["id"],
            "error_file_id": results[1]["id"],
        }

        def make_batch() -> tuple[dict[str, Any], dict[str, Any]]:
            batch_update = {
                "endpoint": state["url"],
                "models": json.dumps(sorted(models)),
                "total_requests": state["count"],
            }
            return batch_update, file_summary(hasher, state, models)

        file_row = {
            "id": file_id,
            "name": name,
            "purpose": "batch",
            "created_at": now,
            "owner": owner,
        }
        chunks = self._template_chunks(stream, endpoint, file_id, models, state, upstream)
        self.store.submit(file_row, batch_row, chunks, make_batch, results)
        log.info(
            "batch %s submitted: %d requests, models %s", batch_id, state["count"], sorted(models)
        )
        if self.notify:
            self._nudge_claimer()
        return batch_id

    def upload_file(
        self,
        source: Source | ByteLines,
        *,
        name: str | None = None,
        owner: str | None = None,
        finish: Callable[[], UploadDetails] | None = None,
    ) -> dict[str, Any]:
        """Validate and store a JSONL file of requests on its own (OpenAI's first step:
        upload, then ``create_batch``); returns its File object. Validation is
        ``submit_batch``'s, line by line as the file is read; a refused file stores nothing.
        ``finish()``, called once the whole file is read and before it is kept, may refuse
        it (raise) or give its name and expiry."""
        file_name, stream, hasher = open_source(source, name)
        file_id = new_file_id()
        models: dict[str, int] = {}
        state: dict[str, Any] = {"count": 0, "url": None}
        file_row = {
            "id": file_id,
            "name": file_name[:512],
            "purpose": "batch",
            "created_at": time.time(),
            "owner": owner,
        }

        def make_file() -> dict[str, Any]:
            summary = file_summary(hasher, state, models)
            if finish is not None:
                details = finish()
                summary["expires_at"] = details.expires_at
                if details.name:
                    summary["name"] = details.name[:512]
            return summary

        chunks = self._template_chunks(stream, None, file_id, models, state, None)
        self.store.store_file(file_row, chunks, make_file)
        log.info("file %s stored: %d requests, models %s", file_id, state["count"], sorted(models))
        return file_object(self.store.file_row(file_id, owner, time.time()))

    def create_batch(
        self,
        input_file_id: str,
        *,
        endpoint: str,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """A batch of the requests of an uploaded file (``upload_file``); returns its Batch
        object. Several batches may be made from one file."""
        window_s = window_seconds(completion_window)
        meta = check_metadata(metadata)
        now = time.time()
        try:
            file = self.store.file_row(input_file_id, owner, now)
        except NotFound:
            raise NotFound(f"no file {input_file_id!r}") from None
        if file["purpose"] != "batch" or file["request_count"] is None:
            raise InputError(
                f"file {input_file_id!r} is a {file['purpose']} file, not a batch input file",
                field="input_file_id",
            )
        if endpoint != file["endpoint"]:
            raise InputError(
                f"is {endpoint!r} but the lines of {input_file_id!r} are for {file['endpoint']!r}",
                field="endpoint",
            )
        batch_id = new_batch_id()
        results = result_file_rows(batch_id, owner, now)
        batch_row = {
            "id": batch_id,
            "file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
            "expires_at": deadline(now, window_s),
            "metadata": json.dumps(meta) if meta is not None else None,
            "owner": owner,
            "models": file["models"],
            "total_requests": file["request_count"],
            "created_at": now,
            "output_file_id": results[0]["id"],
            "error_file_id": results[1]["id"],
        }
        self.store.create_batch_from_file(batch_row, results)
        log.info("batch %s created from %s", batch_id, input_file_id)
        if self.notify:
            self._nudge_claimer()
        return self.get_batch(batch_id, owner=owner)

    def retry_batch(self, batch_id: str, *, owner: str | None = None) -> dict[str, Any]:
        """Failed requests of a finished (completed, failed or expired) batch go back to
        pending, under a new deadline of the batch's completion window from now; its
        completed results stay. Returns the Batch object. Raises :class:`Conflict` when the
        batch is running, cancelled, or has no failed request."""
        row = self.store.get_batch_row(batch_id, owner)
        status = batch_status(row)
        if status not in (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED):
            raise Conflict(f"batch {batch_id} is {status.value}: only a finished batch is retried")
        now = time.time()
        expires_at = deadline(now, window_seconds(row["completion_window"]))
        if not self.store.retry_failed(batch_id, now, expires_at):
            raise Conflict(f"batch {batch_id} has no failed request to retry")
        log.info("batch %s: failed requests retried", batch_id)
        if self.notify:
            self._nudge_claimer()
        return self.get_batch(batch_id, owner=owner)

    def _template_chunks(
        self,
        stream: Any,
        endpoint: str | None,
        file_id: str,
        models: dict[str, int],
        state: dict[str, Any],
        upstream: str | None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Template rows of the validated lines, ``CHUNK`` at a time; counts the lines and
        collects their url and models into ``state`` and ``models`` on the way."""
        limits = Limits(self.settings.max_line_bytes, self.settings.max_file_bytes)
        chunk: list[dict[str, Any]] = []
        for line in parse_lines(stream, limits, endpoint, processor_paths(self.settings)):
            self._check_model(line, models, upstream)
            state["count"] += 1
            state["url"] = line.url
            chunk.append(template_row(file_id, line))
            if len(chunk) >= CHUNK:
                yield chunk
                chunk = []
        yield chunk

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

    def get_batch(
        self, batch_id: str, *, counts_max_age_s: float = 0.0, owner: str | None = None
    ) -> dict[str, Any]:
        """The OpenAI Batch object, with ``request_counts``.

        Status and timestamps are always read fresh. Counting is a scan of the batch's rows
        (about 1 us a row: 20 ms at 20,000, a second at 1,000,000), so a poller may accept
        counts up to ``counts_max_age_s`` old for a running batch (``status --watch``, the
        progress bars and the HTTP API use 0.5 s). A finished batch's counts never change
        until it is retried: they are counted once after it ends and kept, keyed by its
        closing timestamps (a retried batch closes again at other times)."""
        row = self.store.get_batch_row(batch_id, owner)
        return batch_object(row, self.counts_of(row, counts_max_age_s))

    def counts_of(self, row: dict[str, Any], counts_max_age_s: float = 0.0) -> dict[str, int]:
        """The request counts of a batch row, cached as ``get_batch`` says."""
        batch_id = row["id"]
        stamp = finish_stamp(row)
        cached = self._counts.get(batch_id)
        now = time.monotonic()
        if cached is not None and (
            (stamp is not None and cached[2] == stamp)
            or (stamp is None and cached[2] is None and now - cached[0] <= counts_max_age_s)
        ):
            return cached[1]
        counts = self.store.request_counts(batch_id)
        if stamp is not None or counts_max_age_s > 0:
            if len(self._counts) >= 1024:  # a long-lived client: forget the oldest
                self._counts.pop(next(iter(self._counts)))
            self._counts[batch_id] = (now, counts, stamp)
        return counts

    def list_batches(self, limit: int = 20, owner: str | None = None) -> list[dict[str, Any]]:
        """The newest batches, newest first (of ``owner``, when given)."""
        return [
            batch_object(row, self.counts_of(row))
            for row in self.store.list_batch_page(owner, limit)
        ]

    def iter_results(
        self, batch_id: str, errors: bool = False, owner: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """OpenAI output lines (or error lines), in input order, streamed; usable while the
        batch runs (partial results) and after expiry or cancel."""
        self.store.get_batch_row(batch_id, owner)  # NotFound for unknown or deleted batches
        states = (
            [RequestState.FAILED, RequestState.CANCELED] if errors else [RequestState.COMPLETED]
        )
        for row in self.store.iter_result_rows(batch_id, states):
            yield result_line(row)

    def get_file(self, file_id: str, owner: str | None = None) -> dict[str, Any]:
        """The OpenAI File object of an input, output or error file."""
        return file_object(self.store.file_row(file_id, owner, time.time()))

    def iter_file(self, file_id: str, owner: str | None = None) -> Iterator[dict[str, Any]]:
        """The lines of a file: the input as stored, or a batch's output / error file."""
        row = self.store.file_row(file_id, owner, time.time())
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

    def delete_batch(self, batch_id: str, owner: str | None = None) -> None:
        """Soft delete (unfinished requests are cancelled first). The batch is no longer
        readable; the purge task erases its requests and responses in the background."""
        self.store.get_batch_row(batch_id, owner)
        self.store.delete_batch(batch_id, time.time())
        self._announce_cancel(batch_id)

    def delete_file(self, file_id: str, owner: str | None = None) -> None:
        """Soft delete a file; an input file's request bodies are purged once no batch uses
        them."""
        now = time.time()
        self.store.file_row(file_id, owner, now)
        self.store.delete_file(file_id, now)

    def cancel_batch(self, batch_id: str, owner: str | None = None) -> dict[str, Any]:
        """Stop the batch: nothing new starts; unfinished requests end ``canceled``; finished
        results stay readable. Returns the Batch object (``cancelling``, then ``cancelled``)."""
        self.store.get_batch_row(batch_id, owner)
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


class Conflict(RuntimeError):
    """The batch is not in a state the change applies to (cancel or retry a finished or
    running batch): asking again will not help."""


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
    "Conflict",
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
