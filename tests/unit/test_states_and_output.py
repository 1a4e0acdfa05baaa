"""The state machine table and the OpenAI views built on it."""

from __future__ import annotations

import json

from fusillade_celery.output import batch_object, result_id, result_line
from fusillade_celery.states import TERMINAL, TRANSITIONS, BatchStatus, RequestState, batch_status

S = RequestState


def test_terminal_states_never_move_except_explicit_retry_of_failed() -> None:
    assert not TRANSITIONS[S.COMPLETED] and not TRANSITIONS[S.CANCELED]
    assert TRANSITIONS[S.FAILED] == {S.PENDING}
    for state in set(S) - TERMINAL:
        assert S.CANCELED in TRANSITIONS[state], f"{state} must be cancellable"


def test_batch_status_follows_the_latest_milestone() -> None:
    row = {"created_at": 1.0}
    assert batch_status(row) is BatchStatus.VALIDATING
    row["in_progress_at"] = 2.0
    assert batch_status(row) is BatchStatus.IN_PROGRESS
    row["finalizing_at"] = 3.0
    assert batch_status(row) is BatchStatus.FINALIZING
    row["completed_at"] = 4.0
    assert batch_status(row) is BatchStatus.COMPLETED
    assert batch_status({"cancelling_at": 1.0}) is BatchStatus.CANCELLING
    assert batch_status({"cancelling_at": 1.0, "cancelled_at": 2.0}) is BatchStatus.CANCELLED
    assert batch_status({"expired_at": 2.0, "finalizing_at": 2.0}) is BatchStatus.EXPIRED


def test_output_line_has_the_openai_shape() -> None:
    body = {"id": "chatcmpl-1", "choices": []}
    out = result_line(
        {
            "id": 7,
            "batch_id": "batch_x",
            "custom_id": "a",
            "state": "completed",
            "response_status": 200,
            "response_body": json.dumps(body),
            "error": None,
        }
    )
    assert out == {
        "id": "batch_req_" + result_id("batch_x", "a"),
        "custom_id": "a",
        "response": {"status_code": 200, "request_id": "chatcmpl-1", "body": body},
        "error": None,
    }


def test_error_lines_carry_code_and_message() -> None:
    http = result_line(
        {
            "id": 8,
            "batch_id": "batch_x",
            "custom_id": "b",
            "state": "failed",
            "response_status": 400,
            "response_body": '{"error": "bad"}',
            "error": json.dumps({"kind": "non_retriable_http_status", "detail": "HTTP 400"}),
        }
    )
    assert http["response"]["status_code"] == 400
    assert http["error"] == {"code": "non_retriable_http_status", "message": "HTTP 400"}
    expired = result_line(
        {
            "id": 9,
            "batch_id": "batch_x",
            "custom_id": "c",
            "state": "failed",
            "response_status": None,
            "response_body": None,
            "error": json.dumps({"kind": "batch_expired", "detail": "late"}),
        }
    )
    assert expired["response"] is None and expired["error"]["code"] == "batch_expired"


def test_batch_object_counts_canceled_as_failed() -> None:
    row = {
        "id": "batch_1",
        "endpoint": "/v1/embeddings",
        "file_id": "file-1",
        "completion_window": "24h",
        "total_requests": 5,
        "created_at": 10.5,
        "expires_at": 100.0,
        "metadata": '{"k": "v"}',
    }
    obj = batch_object(row, {"completed": 2, "failed": 1, "canceled": 1, "pending": 1})
    assert obj["object"] == "batch" and obj["status"] == "validating"
    assert obj["request_counts"] == {"total": 5, "completed": 2, "failed": 2}
    assert obj["created_at"] == 10 and obj["metadata"] == {"k": "v"}
