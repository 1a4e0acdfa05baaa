"""``POST /v1/files`` as the body arrives: the event loop hands body chunks to a thread that
parses the multipart form (python-multipart's push parser) and feeds the file part, line by
line, into ``Client.upload_file`` (the validation and chunked storage ``submit_batch`` uses).
Nothing spools the whole body: at most ``PIPE_DEPTH`` chunks wait between the two, so the
client is read at the pace the database takes the lines."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import anyio
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from ..intake import UploadDetails
from ..submit import Client
from ..validation import ByteLines, InputError
from .errors import ApiError, FileTooLarge

#: Body chunks in flight between the event loop and the parsing thread (~64 KiB each).
PIPE_DEPTH = 16
#: Multipart framing and form fields allowed beyond FUSILLADE_MAX_FILE_BYTES.
FRAMING_BYTES = 1 << 20
#: Longest form field other than the file (purpose, expires_after[...]).
MAX_FIELD_BYTES = 4096
#: OpenAI's bounds of ``expires_after[seconds]``: one hour to 30 days.
EXPIRY_RANGE_S = (3600, 2_592_000)
_END = object()


class Pipe:
    """Body chunks from the event loop to the parsing thread; closed by the reader when it
    stops early (a bad line), after which the event loop only drains the body."""

    def __init__(self, depth: int = PIPE_DEPTH):
        self._q: queue.Queue[Any] = queue.Queue(depth)
        self.closed = threading.Event()

    def _put(self, item: Any) -> bool:
        while not self.closed.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    async def put(self, item: Any) -> bool:
        """Hand on ``item`` (False: the reader stopped). Waits in a thread only when full."""
        if self.closed.is_set():
            return False
        try:
            self._q.put_nowait(item)
            return True
        except queue.Full:
            return await anyio.to_thread.run_sync(self._put, item)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class MultipartFile:
    """The parts of one multipart body: the ``file`` part's bytes as they come, the other
    fields kept (small). Runs in the parsing thread."""

    def __init__(self, boundary: bytes, chunks: Iterable[bytes], max_file_bytes: int):
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.max_file_bytes = max_file_bytes
        self.file_bytes = 0
        self._chunks = chunks
        self._boundary = boundary
        self._out: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._part: str | None = None  # "file", a field name, or None
        self._file_seen = False
        self._ended = False

    # python-multipart callbacks ----------------------------------------------------------

    def _part_begin(self) -> None:
        self._headers = {}
        self._value = b""
        self._part = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        name = self._field.lower()
        self._headers[name] = self._headers.get(name, b"") + data[start:end]

    def _header_end(self) -> None:
        self._field = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            if self._file_seen:
                raise InputError("more than one file part", field="file")
            self._file_seen = True
            filename = params.get(b"filename")
            self.filename = filename.decode("utf-8", "replace") if filename else None
        self._part = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self.file_bytes += end - start
            if self.file_bytes > self.max_file_bytes:
                raise FileTooLarge(self.max_file_bytes)
            self._out.append(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise InputError(f"longer than {MAX_FIELD_BYTES} bytes", field=self._part)

    def _part_end(self) -> None:
        if self._part and self._part != "file":
            self.fields[self._part] = self._value.decode("utf-8", "replace")

    def _end(self) -> None:
        self._ended = True

    # ------------------------------------------------------------------------------------

    def blocks(self) -> Iterator[bytes]:
        """The file part's bytes, as the body arrives."""
        parser = MultipartParser(
            self._boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )
        for chunk in self._chunks:
            parser.write(chunk)
            if self._out:
                yield from self._out
                self._out.clear()
        parser.finalize()
        if not self._ended:
            raise InputError("the multipart body ended before its closing boundary")
        if not self._file_seen:
            raise InputError("is required (a multipart part named 'file')", field="file")

    def lines(self, max_line_bytes: int) -> Iterator[bytes]:
        """The file part split into lines (each with its newline), as a file reads."""
        carry = b""
        number = 0
        for block in self.blocks():
            if carry:
                block = carry + block
            start = 0
            while (i := block.find(b"\n", start)) >= 0:
                number += 1
                yield block[start : i + 1]
                start = i + 1
            carry = block[start:]
            if len(carry) > max_line_bytes:  # no newline in sight: do not buffer it all
                raise InputError(
                    f"line is over {max_line_bytes} bytes (FUSILLADE_MAX_LINE_BYTES)",
                    line=number + 1,
                )
        if carry:
            yield carry

    def details(self) -> UploadDetails:
        """The form's other fields, checked once the body is read (they may follow the
        file): ``purpose`` must be ``batch``; ``expires_after`` is optional."""
        purpose = self.fields.get("purpose")
        if purpose != "batch":
            raise InputError(
                f"must be 'batch' (this server runs batches), got {purpose!r}", field="purpose"
            )
        anchor = self.fields.get("expires_after[anchor]")
        seconds = self.fields.get("expires_after[seconds]")
        if anchor is None and seconds is None:
            return UploadDetails(self.filename, None)
        if anchor != "created_at":
            raise InputError("must be 'created_at'", field="expires_after.anchor")
        try:
            after = int(seconds or "")
        except ValueError:
            after = 0
        low, high = EXPIRY_RANGE_S
        if not low <= after <= high:
            raise InputError(
                f"must be a whole number of seconds from {low} to {high}",
                field="expires_after.seconds",
            )
        return UploadDetails(self.filename, time.time() + after)


def boundary_of(request: Request) -> bytes:
    """The multipart boundary of the request; 400 when it is not multipart/form-data."""
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise ApiError(
            400,
            "expected a multipart/form-data body with a 'file' part and purpose=batch",
            param="file",
        )
    return boundary


async def receive_file(request: Request, client: Client, owner: str | None) -> dict[str, Any]:
    """Store the request's uploaded file as it arrives; its File object."""
    settings = client.settings
    boundary = boundary_of(request)
    limit = settings.max_file_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + FRAMING_BYTES:
        raise FileTooLarge(limit)
    pipe = Pipe()
    form = MultipartFile(boundary, pipe, limit)
    outcome: dict[str, Any] = {}

    def store() -> None:
        try:
            outcome["file"] = client.upload_file(
                ByteLines(form.lines(settings.max_line_bytes)), owner=owner, finish=form.details
            )
        except BaseException as exc:  # noqa: BLE001 - raised below, in the request
            outcome["error"] = exc
        finally:
            pipe.closed.set()

    async def pump() -> None:
        """Body chunks to the parser; once it has stopped, read the rest to throw it away
        (so the client sees the answer rather than a reset), up to the size limit."""
        seen = 0
        try:
            async for chunk in request.stream():
                seen += len(chunk)
                if chunk and not await pipe.put(chunk) and seen > limit + FRAMING_BYTES:
                    return
            await pipe.put(_END)
        except Exception as exc:  # noqa: BLE001 - a client gone mid-body: the parser raises it
            await pipe.put(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(pump)
        await anyio.to_thread.run_sync(store)
    error = outcome.get("error")
    if isinstance(error, ClientDisconnect):  # nobody to answer; nothing was stored
        raise ApiError(400, "the client went away during the upload", param="file")
    if error is not None:
        raise error
    return dict(outcome["file"])
