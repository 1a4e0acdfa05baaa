"""What a submitted file goes through before the store sees it: opened and hashed, its lines
made into template rows, its metadata checked; and the rows a new batch starts with. Shared
by ``submit_batch``, ``upload_file`` and ``create_batch`` (the CLI, the Python helper and
the HTTP API)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import parse_duration_s
from .states import TERMINAL_BATCH, batch_status
from .validation import ByteLines, InputError, ParsedLine, Source

MAX_METADATA_PAIRS = 16
#: Rows per chunk of templates written (a COPY on PostgreSQL).
CHUNK = 5000


class Hashing:
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


def check_metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
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


def template_row(file_id: str, line: ParsedLine) -> dict[str, Any]:
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


def open_source(
    source: Source | ByteLines, name: str | None = None
) -> tuple[str, Any, Hashing | None]:
    """(file name, stream for the parser, hasher or None for dict iterables)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise InputError(f"{path} is a directory, not a JSONL file")
        if not path.is_file():
            raise InputError(f"no such file: {path}")
        hasher = Hashing(_Lines(path))
        return name or path.name, ByteLines(hasher), hasher
    if isinstance(source, ByteLines) or hasattr(source, "read"):
        hasher = Hashing(source)
        name = name or os.path.basename(str(getattr(source, "name", "") or "upload.jsonl"))
        return name, ByteLines(hasher), hasher
    return name or "lines.jsonl", source, None


class _Lines:
    """Reopens the path on iteration so the file is closed when parsing ends."""

    def __init__(self, path: Path):
        self.path = path

    def __iter__(self) -> Iterator[bytes]:
        with self.path.open("rb") as fh:
            yield from fh


@dataclass(frozen=True)
class UploadDetails:
    """What an upload's caller learns only once the file is read (a multipart body may send
    the file's name and its expiry after the file): ``upload_file``'s ``finish``."""

    name: str | None = None
    expires_at: float | None = None


def result_file_rows(batch_id: str, owner: str | None, now: float) -> list[dict[str, Any]]:
    """The output and error file rows of a new batch. They exist from the start, so a
    caller reads partial results while the batch runs; their lines are rendered from the
    requests when read, so nothing is copied."""
    return [
        {
            "id": new_file_id(),
            "name": f"{batch_id}_{purpose.split('_')[1]}.jsonl",
            "purpose": purpose,
            "bytes": 0,
            "batch_id": batch_id,
            "created_at": now,
            "owner": owner,
        }
        for purpose in ("batch_output", "batch_error")
    ]


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex


def deadline(now: float, window_s: int) -> float:
    """Whole seconds: the deadline the engine enforces is the ``expires_at`` the Batch
    object shows (an integer), never up to a second after it; rounded up, so the window is
    never shorter than the one asked for."""
    return float(math.ceil(now) + window_s)


def finish_stamp(row: dict[str, Any]) -> tuple[Any, ...] | None:
    """A finished batch's closing timestamps (None while it runs): its counts' cache key."""
    if batch_status(row) not in TERMINAL_BATCH:
        return None
    return (row["completed_at"], row["failed_at"], row["expired_at"], row["cancelled_at"])


def window_seconds(completion_window: str) -> int:
    try:
        return parse_duration_s(completion_window)
    except ValueError as exc:
        raise InputError(str(exc), field="completion_window") from None


def file_summary(
    hasher: Hashing | None, state: dict[str, Any], models: dict[str, int]
) -> dict[str, Any]:
    """The columns of an input file known once it is all read."""
    summary: dict[str, Any] = {
        "bytes": hasher.bytes if hasher else 0,
        "endpoint": state["url"],
        "models": json.dumps(sorted(models)),
        "request_count": state["count"],
    }
    if hasher is not None:
        summary["sha256"] = hasher.sha256.hexdigest()
    return summary
