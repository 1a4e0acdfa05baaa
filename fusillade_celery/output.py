"""OpenAI-format views: the Batch object and the output / error file lines
(docs/architecture.md section 7)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .states import RequestState, batch_status

TIMESTAMPS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def batch_object(row: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """The OpenAI Batch object. ``failed`` in request_counts includes canceled requests, so
    that ``completed + failed == total`` once the batch is finished."""
    obj: dict[str, Any] = {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "errors": json.loads(row["errors"]) if row.get("errors") else None,
        "input_file_id": row["file_id"],
        "completion_window": row["completion_window"],
        "status": batch_status(row).value,
        "output_file_id": row.get("output_file_id"),
        "error_file_id": row.get("error_file_id"),
    }
    obj.update({name: _ts(row.get(name)) for name in TIMESTAMPS})
    obj["request_counts"] = {
        "total": row["total_requests"],
        "completed": counts.get(RequestState.COMPLETED.value, 0),
        "failed": counts.get(RequestState.FAILED.value, 0)
        + counts.get(RequestState.CANCELED.value, 0),
    }
    obj["metadata"] = json.loads(row["metadata"]) if row.get("metadata") else None
    return obj


def result_id(batch_id: str, custom_id: str) -> str:
    """A result line's id: a hash of its custom_id keyed by the batch's (random) id. Stable
    (the CLI, the helper and the API print the same) and unguessable; the row's sequence
    number it replaces told every tenant how many requests the engine had taken."""
    digest = hashlib.blake2b(custom_id.encode(), key=batch_id.encode()[:64], digest_size=12)
    return digest.hexdigest()


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI File object. An output or error file's lines are rendered from the
    requests when read, so its ``bytes`` is 0."""
    return {
        "id": row["id"],
        "object": "file",
        "bytes": int(row["bytes"] or 0),
        "created_at": int(row["created_at"]),
        "expires_at": _ts(row.get("expires_at")),
        "filename": row["name"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
    }


def _body(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def result_line(row: dict[str, Any]) -> dict[str, Any]:
    """One line of the output file (completed) or the error file (failed / canceled)."""
    rid = result_id(row["batch_id"], row["custom_id"])
    response = None
    if row["response_status"] is not None:
        body = _body(row["response_body"])
        request_id = body.get("id") if isinstance(body, dict) else None
        response = {
            "status_code": row["response_status"],
            "request_id": request_id or f"req_{rid}",
            "body": body,
        }
    error = None
    if row["state"] != RequestState.COMPLETED.value:
        detail = json.loads(row["error"]) if row["error"] else {}
        error = {"code": detail.get("kind") or "failed", "message": detail.get("detail", "")}
    return {
        "id": f"batch_req_{rid}",
        "custom_id": row["custom_id"],
        "response": response,
        "error": error,
    }
