"""Following a batch from a terminal: its progress bar, the poll until it ends, the warning
when no worker consumes one of its models, its models' retries and last upstream failures,
and its results written as JSONL files. Shared by the CLI's ``run`` and ``status --watch``
and by ``demo``."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .states import TERMINAL_BATCH, BatchStatus

if TYPE_CHECKING:
    from .store import ModelOverview


def warn_unserved(client: Any, batch_id: str) -> None:
    """Say so when no live worker consumes a model of a running batch: its requests wait."""
    for model in client.unserved_models(batch_id):
        print(
            f"fusillade-celery: warning: no live worker consumes model.{model}; its requests "
            f"wait (start one: celery -A fusillade_celery worker -Q model.{model})",
            file=sys.stderr,
        )


def ago(seconds: float) -> str:
    """``4 s``, ``3 min``, ``2 h``: how long ago, for people."""
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def overview_dict(o: ModelOverview) -> dict[str, Any]:
    """A model's overview as JSON (``status``'s ``fusillade.models``)."""
    return {
        "pending": o.pending,
        "in_flight": o.in_flight,
        "retrying": o.retrying,
        "last_error": o.last_error_dict(),
    }


def failing(batch: Mapping[str, Any], models: Iterable[ModelOverview], now: float) -> list[str]:
    """One line per model of a running batch that has requests retrying or failed upstream
    since the batch was made: what an unreachable upstream looks like."""
    if BatchStatus(batch["status"]) in TERMINAL_BATCH:
        return []
    lines = []
    for o in models:
        err = o.last_error
        recent = err is not None and err.at >= batch["created_at"]
        if not o.retrying and not recent:
            continue
        text = f"{o.model}: {o.retrying} retrying, {o.in_flight} in flight, {o.pending} pending"
        if err is not None and recent:
            status = f" {err.status_code}" if err.status_code is not None else ""
            text += (
                f"; last upstream error {ago(now - err.at)} ago at {err.host or '(no upstream)'}:"
                f" {err.kind}{status}: {err.message}"
            )
        lines.append(text)
    return lines


def with_models(client: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The Batch object plus, under its own ``fusillade`` key (the rest stays OpenAI's
    shape), each model's unfinished requests and last upstream failure; the models that
    are failing are also said on stderr."""
    models = client.store.batch_overview(batch["id"])
    for text in failing(batch, models, time.time()):
        print(f"fusillade-celery: {text}", file=sys.stderr)
    return {**batch, "fusillade": {"models": {o.model: overview_dict(o) for o in models}}}


def write_jsonl(path: Path, lines: Iterator[dict[str, Any]]) -> int:
    n = 0
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
            fh.write("\n")
            n += 1
    tmp.replace(path)  # a reader never sees half a file
    return n


class ProgressBar:
    """A tqdm progress bar on stderr fed with Batch objects. Given the ``client``, it also
    shows the batch's retrying requests and last upstream failure, read at most every
    ``MODELS_EVERY_S`` (a batch stuck retrying otherwise looked like one at rest)."""

    MODELS_EVERY_S = 2.0

    def __init__(self, label: str, enabled: bool = True, client: Any = None):
        from tqdm import tqdm

        self._client = client if enabled else None
        self._models_at = 0.0
        self._models_note = ""
        self._bar = tqdm(
            total=0,
            desc=label,
            unit="req",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
        )

    def __call__(self, batch: dict[str, Any]) -> None:
        counts = batch["request_counts"]
        done = counts["completed"] + counts["failed"]
        self._bar.total = counts["total"]
        self._bar.set_postfix_str(
            f"{batch['status']} ok={counts['completed']} failed={counts['failed']}"
            + self._models(batch),
            refresh=False,
        )
        self._bar.update(done - self._bar.n)

    def _models(self, batch: dict[str, Any]) -> str:
        if self._client is None or BatchStatus(batch["status"]) in TERMINAL_BATCH:
            return ""  # the counts say how it ended
        now = time.monotonic()
        if now - self._models_at < self.MODELS_EVERY_S:
            return self._models_note
        self._models_at = now
        try:
            models = self._client.store.batch_overview(batch["id"])
        except Exception:  # noqa: BLE001 - the bar carries on without the note
            return self._models_note
        retrying = sum(o.retrying for o in models)
        errors = [
            o.last_error
            for o in models
            if o.last_error is not None and o.last_error.at >= batch["created_at"]
        ]
        note = f" retrying={retrying}" if retrying else ""
        if errors:
            last = max(errors, key=lambda e: e.at)
            note += f" last error: {last.kind} at {last.host or '(no upstream)'}"
        self._models_note = note
        return note

    def close(self) -> None:
        self._bar.close()


def write_results(client: Any, batch_id: str, out: Path, err: Path) -> tuple[int, int]:
    n_out = write_jsonl(out, client.iter_results(batch_id))
    n_err = write_jsonl(err, client.iter_results(batch_id, errors=True))
    return n_out, n_err


def follow(
    client: Any, batch_id: str, on_progress: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    warn_unserved(client, batch_id)
    batch: dict[str, Any] = client.wait_batch(batch_id, on_progress=on_progress)
    return batch


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
