"""The request state machine and the batch status it implies (docs/architecture.md section 3).

Every UPDATE in the store names the state it expects to leave; this table is the list of moves
that exist, so a reviewer can check the store against one place.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class RequestState(enum.StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    PROCESSING = "processing"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


S = RequestState

#: States that hold one of the model's slots (docs/architecture.md invariant 4). ``retrying``
#: keeps its slot through the backoff: its message is already in the model queue and will start
#: without passing the claimer again, so releasing the slot would let the model exceed its limit.
IN_FLIGHT = frozenset({S.CLAIMED, S.PROCESSING, S.RETRYING})
TERMINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELED})
NOT_TERMINAL = frozenset(set(S) - TERMINAL)

#: from-state -> the states it may move to, and who moves it.
TRANSITIONS: Mapping[RequestState, frozenset[RequestState]] = {
    # claimer; a hand-off (claim and start in one, by the worker whose write-back freed the
    # slot: Store.finish); cancel; expiry
    S.PENDING: frozenset({S.CLAIMED, S.PROCESSING, S.CANCELED, S.FAILED}),
    S.CLAIMED: frozenset({S.PROCESSING, S.PENDING, S.CANCELED, S.FAILED}),  # execute; reaper
    S.PROCESSING: frozenset({S.COMPLETED, S.FAILED, S.RETRYING, S.PENDING, S.CANCELED}),
    S.RETRYING: frozenset({S.PROCESSING, S.PENDING, S.CANCELED, S.FAILED}),  # countdown; reaper
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset({S.PENDING}),  # only an explicit user retry
    S.CANCELED: frozenset(),
}


def can_move(src: RequestState, dst: RequestState) -> bool:
    return dst in TRANSITIONS[src]


class ErrorKind(enum.StrEnum):
    """Why a request failed (fusillade's FailureReason, plus the batch-level endings)."""

    RETRIABLE_HTTP_STATUS = "retriable_http_status"
    NON_RETRIABLE_HTTP_STATUS = "non_retriable_http_status"
    NETWORK_ERROR = "network_error"
    TIMEOUT = "timeout"
    TASK_TERMINATED = "task_terminated"
    BUILDER_ERROR = "builder_error"
    BATCH_EXPIRED = "batch_expired"
    BATCH_CANCELLED = "batch_cancelled"
    #: The ``/v1/responses`` loop gave up: a cap was reached or a reply could not be used
    #: (the error's ``reason`` says which). Retrying would end the same way.
    RESPONSE_LOOP_FAILED = "response_loop_failed"
    #: A non-idempotent tool call was interrupted (its worker died mid-call): sending it
    #: again could repeat its side effect, and its answer is lost.
    STEP_ABANDONED = "step_abandoned"

    @property
    def retriable(self) -> bool:
        return self in _RETRIABLE


_RETRIABLE = frozenset(
    {
        ErrorKind.RETRIABLE_HTTP_STATUS,
        ErrorKind.NETWORK_ERROR,
        ErrorKind.TIMEOUT,
        ErrorKind.TASK_TERMINATED,
    }
)


class BatchStatus(enum.StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL_BATCH = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


def batch_status(row: Mapping[str, Any]) -> BatchStatus:
    """OpenAI status from the batch's timestamps; the latest milestone wins."""
    if row.get("cancelled_at"):
        return BatchStatus.CANCELLED
    if row.get("expired_at"):
        return BatchStatus.EXPIRED
    if row.get("failed_at"):
        return BatchStatus.FAILED
    if row.get("completed_at"):
        return BatchStatus.COMPLETED
    if row.get("cancelling_at"):
        return BatchStatus.CANCELLING
    if row.get("finalizing_at"):
        return BatchStatus.FINALIZING
    if row.get("in_progress_at"):
        return BatchStatus.IN_PROGRESS
    return BatchStatus.VALIDATING
