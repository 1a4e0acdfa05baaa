"""Following a batch from a terminal: its progress bar, the poll until it ends, the warning
when no worker consumes one of its models, and its results written as JSONL files. Shared by
the CLI's ``run`` and ``status --watch`` and by ``demo``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def warn_unserved(client: Any, batch_id: str) -> None:
    """Say so when no live worker consumes a model of a running batch: its requests wait."""
    for model in client.unserved_models(batch_id):
        print(
            f"fusillade-celery: warning: no live worker consumes model.{model}; its requests "
            f"wait (start one: celery -A fusillade_celery worker -Q model.{model})",
            file=sys.stderr,
        )


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
    """A tqdm progress bar on stderr fed with Batch objects."""

    def __init__(self, label: str, enabled: bool = True):
        from tqdm import tqdm

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
            f"{batch['status']} ok={counts['completed']} failed={counts['failed']}", refresh=False
        )
        self._bar.update(done - self._bar.n)

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
