"""Input parsing and validation of OpenAI Batch JSONL, line by line, before anything is stored.

The parser streams: it holds one line and the set of custom_ids seen, so a million-line file is
validated in bounded memory. Every refusal is an :class:`InputError` naming the line and the
field, because "invalid file" is useless on line 734,512.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

SUPPORTED_ENDPOINTS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/moderations",
    }
)
MAX_CUSTOM_ID = 64
MAX_MODEL_NAME = 256

Source = str | os.PathLike[str] | IO[bytes] | IO[str] | Iterable[dict[str, Any]]


class InputError(ValueError):
    """A refused input. ``line`` is 1-based (None for file-level problems)."""

    def __init__(self, message: str, line: int | None = None, field: str | None = None):
        self.line = line
        self.field = field
        self.reason = message
        parts = [f"line {line}"] if line is not None else []
        if field:
            parts.append(f"field '{field}'")
        # File-level problems read as the message alone: the CLI already says "invalid input".
        super().__init__(f"{', '.join(parts)}: {message}" if parts else message)


@dataclass(frozen=True)
class ParsedLine:
    line_number: int
    custom_id: str
    method: str
    url: str
    body: str  # compact JSON of the body object
    model: str
    body_bytes: int


@dataclass(frozen=True)
class Limits:
    max_line_bytes: int
    max_file_bytes: int


def parse_lines(
    source: Source | ByteLines,
    limits: Limits,
    endpoint: str | None = None,
    extra_endpoints: frozenset[str] = frozenset(),
) -> Iterator[ParsedLine]:
    """Yield validated lines; raise :class:`InputError` at the first bad one.
    ``extra_endpoints``: paths accepted beside the built-in ones (those with a request
    processor of their own, ``processors.processor_paths``)."""
    supported = SUPPORTED_ENDPOINTS | extra_endpoints
    if endpoint is not None and endpoint not in supported:
        raise InputError(
            f"unsupported endpoint {endpoint!r}; {_named(supported)}", field="endpoint"
        )
    seen: set[str] = set()
    expected_url = endpoint
    count = 0
    for line_number, obj in _objects(source, limits):
        parsed = _check(obj, line_number, seen, expected_url, supported)
        expected_url = parsed.url
        count += 1
        yield parsed
    if count == 0:
        raise InputError("the file holds no requests")


class ByteLines:
    """Marks an iterable of raw byte lines, so it is parsed as JSONL and not as dict lines."""

    def __init__(self, lines: Iterable[bytes]):
        self._lines = lines

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._lines)


def _objects(source: Source | ByteLines, limits: Limits) -> Iterator[tuple[int, Any]]:
    if isinstance(source, ByteLines):
        yield from _objects_from_bytes(source, limits)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"no such file: {path}")
        with path.open("rb") as fh:
            yield from _objects_from_bytes(fh, limits)
    elif hasattr(source, "read"):
        yield from _objects_from_bytes(_as_bytes(source), limits)  # type: ignore[arg-type]
    else:
        yield from _objects_with_limits(source, limits)


def _objects_with_limits(objects: Iterable[Any], limits: Limits) -> Iterator[tuple[int, Any]]:
    """Lines given as objects (the Python API) meet the same size limits as a file's, on
    the size they have as JSON lines."""
    total = 0
    for line_number, obj in enumerate(objects, start=1):
        try:
            size = len(json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")) + 1
        except (TypeError, ValueError):
            size = 0  # not JSON-serializable: _check names what is wrong with it
        total += size
        if total > limits.max_file_bytes or size > limits.max_line_bytes:
            _size_error(line_number, size, total, limits)
        yield line_number, obj


def _size_error(line_number: int, size: int, total: int, limits: Limits) -> None:
    """Raise for the limit crossed: the file's (bytes so far), else the line's. Called only
    once a limit is crossed, so the per-line cost is the two comparisons at the caller."""
    if total > limits.max_file_bytes:
        raise InputError(
            f"the file exceeds {limits.max_file_bytes} bytes (FUSILLADE_MAX_FILE_BYTES)",
            line=line_number,
        )
    if size > limits.max_line_bytes:
        raise InputError(
            f"line is {size} bytes, the limit is {limits.max_line_bytes} "
            "(FUSILLADE_MAX_LINE_BYTES)",
            line=line_number,
        )


def _as_bytes(lines: Iterable[bytes | str]) -> Iterator[bytes]:
    """Text streams go through the same byte-level checks as binary ones."""
    for line in lines:
        yield line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line


def _objects_from_bytes(fh: Iterable[bytes], limits: Limits) -> Iterator[tuple[int, Any]]:
    total = 0
    for line_number, raw in enumerate(fh, start=1):
        total += len(raw)
        if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark, as some Windows editors write
        if total > limits.max_file_bytes or len(raw) > limits.max_line_bytes:
            _size_error(line_number, len(raw), total, limits)
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"not valid UTF-8 (byte {exc.start})", line=line_number) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"not valid JSON: {exc.msg} (column {exc.colno})", line=line_number
            ) from None
        yield line_number, obj


def _named(supported: frozenset[str]) -> str:
    return "supported: " + ", ".join(sorted(supported))


def _check(
    obj: Any, line: int, seen: set[str], expected_url: str | None, supported: frozenset[str]
) -> ParsedLine:
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", line=line)
    custom_id = obj.get("custom_id")
    if custom_id is None:
        raise InputError("is required", line=line, field="custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InputError("must be a non-empty string", line=line, field="custom_id")
    if len(custom_id) > MAX_CUSTOM_ID:
        raise InputError(
            f"is {len(custom_id)} characters, at most {MAX_CUSTOM_ID} are allowed",
            line=line,
            field="custom_id",
        )
    if "\x00" in custom_id:  # PostgreSQL text cannot hold it
        raise InputError("must not contain a NUL character", line=line, field="custom_id")
    if custom_id in seen:
        raise InputError(f"duplicate custom_id {custom_id!r}", line=line, field="custom_id")
    seen.add(custom_id)
    method = obj.get("method")
    if method != "POST":
        raise InputError(f'must be "POST", got {method!r}', line=line, field="method")
    url = obj.get("url")
    if not isinstance(url, str) or url not in supported:
        raise InputError(
            f"unsupported endpoint {url!r}; {_named(supported)}",
            line=line,
            field="url",
        )
    if expected_url is not None and url != expected_url:
        raise InputError(
            f"is {url!r} but the batch endpoint is {expected_url!r}; one batch, one endpoint",
            line=line,
            field="url",
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        raise InputError("must be a JSON object", line=line, field="body")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InputError("is required (a non-empty string)", line=line, field="body.model")
    if len(model) > MAX_MODEL_NAME or any(c.isspace() for c in model) or not model.isprintable():
        raise InputError(
            "is not a valid model name (no whitespace or control characters, at most "
            f"{MAX_MODEL_NAME} characters)",
            line=line,
            field="body.model",
        )
    try:
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:  # NaN or Infinity: Python's json reads them, JSON has no such values
        raise InputError(
            "contains NaN or Infinity, which are not JSON", line=line, field="body"
        ) from None
    except TypeError as exc:  # Python API: a value JSON cannot represent
        raise InputError(f"is not JSON-serializable ({exc})", line=line, field="body") from None
    for name, value in (("custom_id", custom_id), ("body", text)):
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate, escaped as \udXXX in the JSON
            raise InputError("contains an invalid Unicode escape", line=line, field=name) from None
    return ParsedLine(
        line_number=line,
        custom_id=custom_id,
        method=method,
        url=url,
        body=text,
        model=model,
        body_bytes=size,
    )
