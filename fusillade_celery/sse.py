"""Streamed upstream calls: the body asks for Server-Sent Events, and the events are read as
they come and reassembled into the object a buffered call returns, so output files are the
same either way.

Why stream at all: a long generation sends bytes all along, so proxies that cut idle
connections leave it alone, and a stalled upstream is noticed after ``stream_idle_timeout``
instead of the whole attempt's timeout. Formats by the path's suffix: ``chat.completion``
(``/chat/completions``), ``text_completion`` (``/completions``) and the Responses API
(``/responses``: the ``response`` of its ``response.completed`` event).

What is not a success: an error object inside a 200 stream (vLLM's ``{"error": {...}}``, the
Responses API's ``response.failed`` and ``error`` events) is an ``ErrorEvent`` with the HTTP
status it stands for (classified like that status); a stream that ends before its terminal
event (``[DONE]``, ``response.completed``), an empty one, or an event that is not JSON is a
``BrokenStream`` (a retriable network error); no event in time is a ``StreamTimeout``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import requests
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from .reassemble import ASSEMBLERS, BrokenStream, ErrorEvent
from .settings import STREAMABLE_SUFFIXES, Settings

if TYPE_CHECKING:
    from .processors.base import Cancellation

#: After the terminal event (or an error event), at most this much more is read, for at
#: most ``DRAIN_S``, so that the connection goes back to the pool (what follows is normally
#: the chunked body's last few bytes); a server that sends more, or not the end, is cut off.
DRAIN_BYTES = 65536
DRAIN_S = 1.0
__all__ = ["BrokenStream", "ErrorEvent", "StreamTimeout", "events", "read", "streams"]


class StreamTimeout(requests.exceptions.ReadTimeout):
    """No event within the first-event or idle timeout, or the stream outlasted its total."""


def format_of(path: str) -> str | None:
    """``chat``, ``text`` or ``responses`` for a streamable path, else None."""
    for suffix, kind in zip(STREAMABLE_SUFFIXES, ("chat", "text", "responses"), strict=True):
        if path.endswith(suffix):
            return kind
    return None


def streams(
    path: str, body: str, route_stream: bool | None, endpoints: frozenset[str]
) -> bool | None:
    """How to send a request: True streamed (the body is rewritten to ask for it), False not
    streamed though its body asks (a route with ``"stream": false``: the body is rewritten
    not to), None as it is, not streamed. A route's flag wins over ``endpoints``; a body that
    asks for ``"stream": true`` is streamed unless its route says no. One set lookup and one
    substring search when nothing streams (the hot path)."""
    if route_stream is None:
        if path in endpoints:
            return True
        if '"stream"' not in body:
            return None
        return True if _asks(body) and format_of(path) is not None else None
    if route_stream:
        return True if format_of(path) is not None else None
    return False if '"stream"' in body and _asks(body) else None


def _asks(body: str) -> bool:
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("stream") is True


def with_stream(body: str, path: str, on: bool) -> str:
    """The body with ``stream`` set; ``/completions`` paths (chat and text) also ask for
    ``stream_options.include_usage`` (the caller's other stream options kept), since a
    buffered reply always carries its usage. Not streaming drops ``stream_options``, which
    OpenAI refuses without ``stream``."""
    obj = json.loads(body)
    if on:
        obj["stream"] = True
        if path.endswith("/completions"):
            options = obj.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            options["include_usage"] = True
            obj["stream_options"] = options
    else:
        obj["stream"] = False
        obj.pop("stream_options", None)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def first_event_s(settings: Settings) -> float:
    """The read timeout for the reply's headers: they come before the first event."""
    return min(settings.stream_first_event_timeout_ms, settings.stream_total_timeout_ms) / 1000.0


def read(
    resp: requests.Response,
    path: str,
    settings: Settings,
    started: float,
    cancel: Cancellation | None = None,
) -> str:
    """The body of a reply sent with ``stream=True``: reassembled JSON for an event stream,
    else the body as it came (an error reply, or a server that answered JSON anyway).
    ``started`` (monotonic) is when the request was sent. Raises ``ErrorEvent``,
    ``BrokenStream``, ``StreamTimeout``, and ``Aborted`` when ``cancel`` says so between two
    reads. The connection goes back to the pool after a complete stream and is closed
    otherwise, so an abandoned upstream call sees its socket close."""
    try:
        content_type = resp.headers.get("content-type", "")
        kind = format_of(path)
        if (
            resp.status_code >= 400
            or kind is None
            or not content_type.startswith("text/event-stream")
        ):
            return resp.text
        clock = _Clock(resp, settings, started)
        assembler = ASSEMBLERS[kind]()
        chunks = _timed(_chunks(resp), clock, cancel)
        try:
            for event, data in events(chunks):
                clock.event()
                try:
                    done = assembler.feed(event, data)
                except ErrorEvent:
                    _drain(chunks, clock)
                    raise
                if done:
                    _drain(chunks, clock)
                    result = assembler.result()
                    return json.dumps(result, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, AttributeError, KeyError, ValueError) as exc:
            # JSON events of a shape no OpenAI-compatible server sends: the upstream's fault,
            # like a chunk that is not JSON (never the worker's exception).
            raise BrokenStream(f"an event has an unexpected shape ({exc!r})") from None
        if assembler.events == 0:
            raise BrokenStream("empty stream: no event before the upstream closed it")
        raise BrokenStream(f"the stream ended before {assembler.terminal}")
    finally:
        resp.close()


def _chunks(resp: requests.Response) -> Iterator[bytes]:
    """The body's bytes as they arrive: per HTTP chunk when chunked (as servers stream), else
    whatever one read returns (a fixed SSE body with a Content-Length)."""
    raw = resp.raw
    if raw.chunked and raw.supports_chunked_reads():
        return iter(raw.read_chunked(decode_content=True))
    return iter(functools.partial(raw.read1, 65536, decode_content=True), b"")


class _Clock:
    """The three timeouts of a stream, applied as the socket's timeout before each read (the
    time left until the nearest deadline): comment lines are data but not events, so a
    stream of keep-alive comments still times out."""

    def __init__(self, resp: requests.Response, settings: Settings, started: float):
        connection = getattr(resp.raw, "connection", None)
        self.sock = getattr(connection, "sock", None)
        self.idle_s = settings.stream_idle_timeout_ms / 1000.0
        self.total_at = started + settings.stream_total_timeout_ms / 1000.0
        first_at = started + settings.stream_first_event_timeout_ms / 1000.0
        self.due = min(first_at, self.total_at)
        self.why = "no event within the first-event timeout"
        if self.due == self.total_at:
            self.why = "the stream outlasted its total timeout"
        self.events = 0

    def event(self) -> None:
        self.events += 1
        idle_at = time.monotonic() + self.idle_s
        if idle_at < self.total_at:
            self.due, self.why = idle_at, "no event within the idle timeout"
        else:
            self.due, self.why = self.total_at, "the stream outlasted its total timeout"

    def arm(self) -> None:
        left = self.due - time.monotonic()
        if left <= 0:
            raise StreamTimeout(self.why)
        if self.sock is not None:
            self.sock.settimeout(left)


def _timed(chunks: Iterator[bytes], clock: _Clock, cancel: Cancellation | None) -> Iterator[bytes]:
    """``chunks`` read under ``clock``, transport errors raised as ``StreamTimeout`` or
    ``BrokenStream`` (so they are classified as timeouts and network errors), the cancel
    checked after each read."""
    while True:
        clock.arm()
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except ReadTimeoutError:
            raise StreamTimeout(clock.why) from None
        except (Urllib3Error, OSError) as exc:
            raise BrokenStream(f"the stream broke after {clock.events} events: {exc}") from None
        if cancel is not None:
            cancel.check()
        yield chunk


def _drain(chunks: Iterator[bytes], clock: _Clock) -> None:
    """Read what follows the last event (``DRAIN_BYTES``, ``DRAIN_S``)."""
    clock.due = min(clock.due, time.monotonic() + DRAIN_S)
    left = DRAIN_BYTES
    try:
        for chunk in chunks:
            left -= len(chunk)
            if left < 0:
                return
    except (StreamTimeout, BrokenStream):
        return


def events(chunks: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """(event type, data) of each Server-Sent Event in ``chunks`` (which may split lines
    anywhere). Comment lines (``:``) and fields other than ``event`` and ``data`` are
    skipped; lines may end in LF, CRLF or CR. An event not closed by a blank line when the
    stream ends is still given (a server may omit the last one)."""
    buf = b""
    event = b""
    data: list[bytes] = []
    for chunk in chunks:
        buf += chunk
        if b"\r" in buf:
            # A CR at the end may be the first half of a CRLF split across two chunks.
            held = buf.endswith(b"\r")
            buf = (buf[:-1] if held else buf).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            lines = buf.split(b"\n")
            buf = lines.pop() + (b"\r" if held else b"")
        else:
            lines = buf.split(b"\n")
            buf = lines.pop()
        for line in lines:
            if not line:
                if data:
                    yield event, b"\n".join(data)
                    data = []
                event = b""
            elif line[0] != 58:  # b":" starts a comment
                name, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if name == b"data":
                    data.append(value)
                elif name == b"event":
                    event = value
    buf = buf.rstrip(b"\r")
    if buf.startswith(b"data:"):
        value = buf[5:]
        data.append(value[1:] if value[:1] == b" " else value)
    if data:
        yield event, b"\n".join(data)
