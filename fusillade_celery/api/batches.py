"""``/v1/batches``: create from an uploaded file, list (newest first), retrieve, cancel; and,
beyond OpenAI as the control layer offers, delete (soft, cancelling first) and retry (the
failed requests of a finished batch run again under a new deadline)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ..states import BatchStatus, batch_status
from ..store import NotFound
from ..submit import Conflict
from .auth import api_owner
from .context import api_of
from .files import page

router = APIRouter(prefix="/v1")
FINISHED = (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED)


class CreateBatch(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, Any] | None = None


@router.post("/batches")
def create_batch(
    body: CreateBatch, request: Request, owner: str | None = Depends(api_owner)
) -> dict[str, Any]:
    api = api_of(request)
    batch = api.client.create_batch(
        body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        metadata=body.metadata,
        owner=owner,
    )
    if api.background is not None:
        api.background.wake()
    return api.batch_view(api.client.store.get_batch_row(batch["id"]))


@router.get("/batches")
def list_batches(
    request: Request,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    owner: str | None = Depends(api_owner),
) -> dict[str, Any]:
    api = api_of(request)
    try:
        rows = api.client.store.list_batch_page(owner, limit + 1, after)
    except NotFound:
        from .errors import ApiError

        raise ApiError(400, f"after: no batch {after!r}", param="after") from None
    return page([api.batch_view(r) for r in rows], limit)


@router.get("/batches/{batch_id}")
def retrieve_batch(
    batch_id: str, request: Request, owner: str | None = Depends(api_owner)
) -> JSONResponse:
    """What pollers call: a JSONResponse, not a dict FastAPI would walk to encode."""
    api = api_of(request)
    return JSONResponse(api.batch_view(api.client.store.get_batch_row(batch_id, owner)))


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(
    batch_id: str, request: Request, owner: str | None = Depends(api_owner)
) -> dict[str, Any]:
    """Cancelling a cancelled or cancelling batch answers its state; a finished one is a
    409 that no retry changes."""
    api = api_of(request)
    status = batch_status(api.client.store.get_batch_row(batch_id, owner))
    if status in FINISHED:
        raise Conflict(f"batch {batch_id} is {status.value}: there is nothing to cancel")
    api.client.cancel_batch(batch_id, owner)
    return api.batch_view(api.client.store.get_batch_row(batch_id, owner))


@router.post("/batches/{batch_id}/retry")
def retry_batch(
    batch_id: str, request: Request, owner: str | None = Depends(api_owner)
) -> dict[str, Any]:
    api = api_of(request)
    api.client.retry_batch(batch_id, owner=owner)
    if api.background is not None:
        api.background.wake()
    return api.batch_view(api.client.store.get_batch_row(batch_id, owner))


@router.delete("/batches/{batch_id}")
def delete_batch(
    batch_id: str, request: Request, owner: str | None = Depends(api_owner)
) -> dict[str, Any]:
    api_of(request).client.delete_batch(batch_id, owner)
    return {"id": batch_id, "object": "batch", "deleted": True}
