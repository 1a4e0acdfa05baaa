"""OpenAI-format views: the Batch object and the output / error file lines
(docs/architecture.md section 7)."""

from __future__ import annotations

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


def _body(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def result_line(row: dict[str, Any]) -> dict[str, Any]:
    """One line of the output file (completed) or the error file (failed / canceled)."""
    response = None
    if row["response_status"] is not None:
        body = _body(row["response_body"])
        request_id = body.get("id") if isinstance(body, dict) else None
        response = {
            "status_code": row["response_status"],
            "request_id": request_id or f"req_{row['id']}",
            "body": body,
        }
    error = None
    if row["state"] != RequestState.COMPLETED.value:
        detail = json.loads(row["error"]) if row["error"] else {}
        error = {"code": detail.get("kind") or "failed", "message": detail.get("detail", "")}
    return {
        "id": f"batch_req_{row['id']}",
        "custom_id": row["custom_id"],
        "response": response,
        "error": error,
    }
