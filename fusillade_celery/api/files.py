"""``/v1/files``: upload (streamed, ``upload.py``), list, retrieve, content, delete, in
OpenAI's shapes. An output or error file's content is rendered from the batch's rows when
read, so it is there (partial) while the batch runs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..output import file_object
from ..store import NotFound
from ..submit import Client
from .auth import api_owner
from .context import api_of
from .errors import ApiError
from .upload import receive_file

router = APIRouter(prefix="/v1")
#: Bytes of JSONL gathered before a content chunk is sent (each is a thread hop).
CONTENT_CHUNK = 64 * 1024
MEDIA_TYPE = "application/jsonl; charset=utf-8"


@router.post("/files")
async def create_file(request: Request, owner: str | None = Depends(api_owner)) -> JSONResponse:
    return JSONResponse(await receive_file(request, api_of(request).client, owner))


@router.get("/files")
def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = Query(10000, ge=1, le=10000),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    owner: str | None = Depends(api_owner),
) -> dict[str, Any]:
    store = api_of(request).client.store
    try:
        rows = store.list_files(owner, time.time(), limit + 1, order == "desc", after, purpose)
    except NotFound:
        raise ApiError(400, f"after: no file {after!r}", param="after") from None
    return page([file_object(r) for r in rows], limit)


def page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """OpenAI's list object from up to ``limit + 1`` items (one more: there are more)."""
    shown = items[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(items) > limit,
    }


@router.get("/files/{file_id}")
def retrieve_file(
    file_id: str, request: Request, owner: str | None = Depends(api_owner)
) -> dict[str, Any]:
    return api_of(request).client.get_file(file_id, owner)


@router.get("/files/{file_id}/content")
def file_content(
    file_id: str, request: Request, owner: str | None = Depends(api_owner)
) -> StreamingResponse:
    return content_response(api_of(request).client, file_id, owner)


def content_response(client: Client, file_id: str, owner: str | None) -> StreamingResponse:
    """The file's JSONL, streamed in CONTENT_CHUNK pieces (NotFound before the first)."""
    row = client.get_file(file_id, owner)
    return StreamingResponse(
        jsonl(client.iter_file(file_id, owner)),
        media_type=MEDIA_TYPE,
        headers={"content-disposition": f'attachment; filename="{_quoted(row["filename"])}"'},
    )


def _quoted(name: str) -> str:
    return "".join(c if c.isprintable() and c not in '"\\' else "_" for c in name)


def jsonl(lines: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    """Lines as the CLI's ``results`` writes them, gathered into chunks."""
    buf: list[str] = []
    size = 0
    for line in lines:
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
        buf.append(text)
        size += len(text)
        if size >= CONTENT_CHUNK:
            yield "".join(buf).encode()
            buf, size = [], 0
    if buf:
        yield "".join(buf).encode()


@router.delete("/files/{file_id}")
def delete_file(
    file_id: str, request: Request, owner: str | None = Depends(api_owner)
) -> dict[str, Any]:
    api_of(request).client.delete_file(file_id, owner)
    return {"id": file_id, "object": "file", "deleted": True}
