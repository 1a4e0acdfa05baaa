"""Reassembly of streamed replies into the object a buffered call returns (``sse.py`` reads
the events): ``chat.completion`` from its chunks, ``text_completion`` from its chunks, and a
Responses API ``response`` from its events; and the HTTP status an in-stream error stands for.

Why its own module: the reading (timeouts, the connection, the event syntax) and the formats
change for different reasons; the multi-step ``/v1/responses`` loop reassembles its model
calls with the same classes.
"""

from __future__ import annotations

import json
from typing import Any

import requests


class BrokenStream(requests.exceptions.ConnectionError):
    """The stream ended early, was empty, or held something that is not an event."""


class ErrorEvent(Exception):
    """An error reported inside a 200 stream: ``status`` is the HTTP status it stands for,
    ``body`` the error as the upstream sent it."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status} in the stream: {body}")
        self.status = status
        self.body = body


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise BrokenStream(f"an event is not JSON: {data[:200]!r}") from None


#: HTTP statuses for the error codes and types of OpenAI-compatible servers that carry no
#: numeric code (substrings of the code, checked in order); anything else counts as 500.
_NAMED_STATUSES = (
    ("rate_limit", 429),
    ("quota", 429),
    ("timeout", 504),
    ("overloaded", 503),
    ("unavailable", 503),
    ("not_found", 404),
    ("invalid", 400),
    ("bad_request", 400),
    ("unsupported", 400),
    ("context_length", 400),
    ("content_filter", 400),
    ("authentication", 401),
    ("permission", 403),
)


def error_status(error: Any) -> int:
    """The HTTP status an in-stream error object stands for: its numeric ``code`` (or
    ``status``) as vLLM sends it, else its named ``code`` or ``type``, else 500."""
    if not isinstance(error, dict):
        return 500
    for key in ("code", "status", "status_code"):
        value = error.get(key)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    for key in ("code", "type"):
        name = error.get(key)
        if isinstance(name, str):
            lowered = name.lower()
            for part, status in _NAMED_STATUSES:
                if part in lowered:
                    return status
    return 500


def _raise_error(obj: Any, data: bytes) -> None:
    """Raise ``ErrorEvent`` when a chat or text chunk is an error: ``{"error": {...}}``, or
    the older ``{"object": "error", "code": ...}``."""
    if isinstance(obj, dict):
        if isinstance(obj.get("error"), dict):
            raise ErrorEvent(error_status(obj["error"]), data.decode("utf-8", "replace"))
        if obj.get("object") == "error":
            raise ErrorEvent(error_status(obj), data.decode("utf-8", "replace"))


def _merge_logprobs(into: dict[str, Any] | None, part: Any) -> dict[str, Any] | None:
    """Logprobs of one chunk added to those so far: lists concatenated (chat ``content`` and
    ``refusal``, text ``tokens``, ``token_logprobs``, ...), other values the last one."""
    if not isinstance(part, dict):
        return into
    merged = {} if into is None else into
    for key, value in part.items():
        if isinstance(value, list):
            previous = merged.get(key)
            merged[key] = (previous if isinstance(previous, list) else []) + value
        elif value is not None or key not in merged:
            merged[key] = value
    return merged


class _Assembler:
    """Reassembly of one stream: ``feed`` each event, true at the terminal one."""

    terminal = "[DONE]"
    object = ""

    def __init__(self) -> None:
        self.events = 0
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: Any = None

    def feed(self, event: bytes, data: bytes) -> bool:
        self.events += 1
        if data == b"[DONE]":
            if self.events == 1:  # nothing before it: no reply to give
                raise BrokenStream("empty stream: [DONE] and nothing before it")
            return True
        obj = _loads(data)
        _raise_error(obj, data)
        if not isinstance(obj, dict):
            raise BrokenStream(f"an event is not a JSON object: {data[:200]!r}")
        for key, value in obj.items():
            if key in ("choices", "usage", "object"):
                continue
            if key not in self.head or (value is not None and key not in ("id", "created")):
                self.head[key] = value
        if obj.get("usage") is not None:
            self.usage = obj["usage"]  # cumulative where sent more than once: the last
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict):
                index = choice.get("index", 0)
                index = index if isinstance(index, int) else 0
                state = self.choices.get(index)
                if state is None:
                    state = self.choices[index] = {"index": index}
                self.choice(state, choice)
        return False

    def choice(self, state: dict[str, Any], choice: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self, state: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.head.pop("id", None),
            "object": self.object,
            "created": self.head.pop("created", None),
            "model": self.head.pop("model", None),
            "choices": [self.finish(self.choices[i]) for i in sorted(self.choices)],
        }
        if self.usage is not None:
            out["usage"] = self.usage
        out.update(self.head)
        return out

    @staticmethod
    def rest(state: dict[str, Any], choice: dict[str, Any], skip: tuple[str, ...]) -> None:
        """A choice's other fields (``finish_reason``, vLLM's ``stop_reason``, ...): the last
        value that is not null."""
        extra = state.setdefault("extra", {})
        for key, value in choice.items():
            if key not in skip and (value is not None or key not in extra):
                extra[key] = value
        if "logprobs" in choice:
            state["logprobs"] = _merge_logprobs(state.get("logprobs"), choice["logprobs"])


def _merge_function(function: dict[str, Any], delta: dict[str, Any]) -> None:
    """A function call's delta: ``arguments`` concatenated, ``name`` sent once (some servers
    repeat it in every delta), other fields the last value."""
    function.setdefault("name", None)
    function.setdefault("arguments", "")
    for key, value in delta.items():
        if key == "arguments" and isinstance(value, str):
            function["arguments"] += value
        elif key == "name":
            if value and not function["name"]:
                function["name"] = value
        elif value is not None:
            function[key] = value


class ChatAssembler(_Assembler):
    """``chat.completion.chunk`` deltas into a ``chat.completion``: text fields (``content``,
    ``refusal``, ...) concatenated, the role set once, tool-call deltas merged by index with
    ``function.arguments`` concatenated."""

    object = "chat.completion"
    _SKIP = ("index", "delta", "logprobs")

    def choice(self, state: dict[str, Any], choice: dict[str, Any]) -> None:
        message = state.setdefault("message", {})
        texts: dict[str, list[str] | None] = state.setdefault("texts", {"content": None})
        delta = choice.get("delta")
        for key, value in delta.items() if isinstance(delta, dict) else ():
            if key == "role":
                if value and not message.get("role"):
                    message["role"] = value
            elif key == "tool_calls":
                self.tool_calls(state.setdefault("tools", {}), value)
            elif key == "function_call" and isinstance(value, dict):  # before tool_calls
                _merge_function(message.setdefault("function_call", {}), value)
            elif isinstance(value, str):
                parts = texts.get(key)
                if parts is None:
                    texts[key] = parts = []
                parts.append(value)
            elif value is None:
                texts.setdefault(key, None)
            else:
                message[key] = value
        self.rest(state, choice, self._SKIP)

    @staticmethod
    def tool_calls(tools: dict[int, dict[str, Any]], deltas: Any) -> None:
        for delta in deltas if isinstance(deltas, list) else ():
            if not isinstance(delta, dict):
                continue
            index = delta.get("index")
            if not isinstance(index, int):  # a continuation without one: the latest call
                index = max(tools) if tools else 0
            call = tools.get(index)
            if call is None:
                call = tools[index] = {"id": None, "type": "function"}
            for key, value in delta.items():
                if key == "function" and isinstance(value, dict):
                    _merge_function(call.setdefault("function", {}), value)
                elif key in ("id", "type"):
                    if value and (call.get(key) is None or key == "type"):
                        call[key] = value
                elif key != "index" and value is not None:
                    call[key] = value

    def finish(self, state: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": state.get("message", {}).get("role", "assistant")}
        for key, parts in state.get("texts", {}).items():
            message[key] = None if parts is None else "".join(parts)
        message.update((k, v) for k, v in state.get("message", {}).items() if k != "role")
        tools = state.get("tools")
        if tools:
            message["tool_calls"] = [tools[i] for i in sorted(tools)]
        out: dict[str, Any] = {"index": state["index"], "message": message}
        if "logprobs" in state:
            out["logprobs"] = state["logprobs"]
        extra = state.get("extra", {})
        out["finish_reason"] = extra.pop("finish_reason", None)
        out.update(extra)
        return out


class TextAssembler(_Assembler):
    """``text_completion`` chunks into one ``text_completion``: ``text`` concatenated,
    logprobs lists joined."""

    object = "text_completion"
    _SKIP = ("index", "text", "logprobs")

    def choice(self, state: dict[str, Any], choice: dict[str, Any]) -> None:
        text = choice.get("text")
        if isinstance(text, str):
            state.setdefault("text", []).append(text)
        self.rest(state, choice, self._SKIP)

    def finish(self, state: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"index": state["index"], "text": "".join(state.get("text", ()))}
        if "logprobs" in state:
            out["logprobs"] = state["logprobs"]
        extra = state.get("extra", {})
        out["finish_reason"] = extra.pop("finish_reason", None)
        out.update(extra)
        return out


class ResponsesAssembler(_Assembler):
    """Responses API events: the ``response`` of ``response.completed`` (or of
    ``response.incomplete``, which a buffered call returns with status 200 as well) is the
    body; ``response.failed`` and ``error`` are errors."""

    terminal = "response.completed"

    def __init__(self) -> None:
        super().__init__()
        self.response: dict[str, Any] | None = None

    def feed(self, event: bytes, data: bytes) -> bool:
        self.events += 1
        if data == b"[DONE]":
            raise BrokenStream("the stream ended ([DONE]) before response.completed")
        obj = _loads(data)
        if not isinstance(obj, dict):
            raise BrokenStream(f"an event is not a JSON object: {data[:200]!r}")
        kind = obj.get("type") or event.decode("utf-8", "replace")
        if kind in ("response.completed", "response.incomplete"):
            response = obj.get("response")
            if not isinstance(response, dict):
                raise BrokenStream(f"{kind} without a response object")
            self.response = response
            return True
        if kind == "response.failed":
            response = obj.get("response")
            error = response.get("error") if isinstance(response, dict) else None
            text = json.dumps(response, ensure_ascii=False, separators=(",", ":"))
            raise ErrorEvent(error_status(error), text)
        if kind == "error":
            error = obj.get("error") if isinstance(obj.get("error"), dict) else obj
            raise ErrorEvent(error_status(error), data.decode("utf-8", "replace"))
        _raise_error(obj, data)
        return False

    def result(self) -> dict[str, Any]:
        assert self.response is not None
        return self.response


ASSEMBLERS: dict[str, type[_Assembler]] = {
    "chat": ChatAssembler,
    "text": TextAssembler,
    "responses": ResponsesAssembler,
}
