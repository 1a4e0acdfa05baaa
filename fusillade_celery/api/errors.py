"""Every failure as OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``,
with the status the official SDKs map to an exception class, and an ``x-request-id`` on every
reply. Never an HTML page or a traceback: an unexpected error is logged here with its request
id and answered 500 with that id only."""

from __future__ import annotations

import logging
import random

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..store import NotFound, unreachable
from ..submit import Conflict
from ..validation import InputError

log = logging.getLogger(__name__)

INVALID = "invalid_request_error"
#: The official SDKs retry 408, 409, 429 and 5xx unless the reply says this: a failure that
#: the same request meets again is not worth their retries.
NO_RETRY = {"x-should-retry": "false"}


class ApiError(Exception):
    """A refusal with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


class FileTooLarge(ApiError):
    """The upload is over ``FUSILLADE_MAX_FILE_BYTES``: 413, before or while it is read."""

    def __init__(self, limit: int):
        super().__init__(
            413,
            f"the file exceeds {limit} bytes (FUSILLADE_MAX_FILE_BYTES)",
            param="file",
            code="file_too_large",
            headers=NO_RETRY,
        )


def error_response(
    status: int,
    message: str,
    type: str = INVALID,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    extra = dict(headers or {})
    if 400 <= status < 500:
        extra.update(NO_RETRY)  # the same request gets the same answer
    return JSONResponse(body, status_code=status, headers=extra)


def _input_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InputError)
    return error_response(400, str(exc), param=exc.field, code="invalid_input")


def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


def _not_found(_: Request, exc: Exception) -> JSONResponse:
    return error_response(404, str(exc), code="not_found")


def _conflict(_: Request, exc: Exception) -> JSONResponse:
    return error_response(409, str(exc), code="conflict")


def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(where) or None
    message = first.get("msg", "invalid request")
    return error_response(400, f"{param}: {message}" if param else message, param=param)


def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, message, code=code, headers=headers)


def _database(request: Request, exc: Exception) -> JSONResponse:
    """The database was away (worth a retry: no x-should-retry) or refused the statement;
    no details either way (an engine error may quote a statement)."""
    assert isinstance(exc, DBAPIError)
    if unreachable(exc):
        log.warning("request %s: database unreachable", _rid(request))
        return error_response(503, "the database is unavailable; try again", "server_error")
    log.error("request %s: database error %s", _rid(request), type(exc.orig).__name__)
    return error_response(500, f"internal error (request {_rid(request)})", "server_error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(DBAPIError, _database)
    app.add_middleware(RequestIds)


def _rid(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", "-"))


class RequestIds:
    """Gives every HTTP exchange an ``x-request-id`` and turns any exception that no handler
    took into a 500 error object (logged with that id). Plain ASGI, so streamed replies pass
    through untouched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = f"req_{random.getrandbits(96):024x}"  # unique, not secret: no urandom call
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).append("x-request-id", rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s %s failed", rid, scope.get("path"))
            if started:  # a streamed reply broke off: nothing else can be said
                raise
            reply = error_response(
                500, f"internal error (request {rid}); the server log has it", "server_error"
            )
            await reply(scope, receive, send_with_id)
