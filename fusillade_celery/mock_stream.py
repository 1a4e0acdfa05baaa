"""The mock upstream's replies (``mock_upstream.py`` serves them): one reply per call, as the
buffered object of its path's format or as the Server-Sent Events a streaming server sends
for it, with the stream faults a line asks for.

Both forms are built from the same parts (text, tool calls, refusal, logprobs, ``n``
choices), each on its own, so a test that compares a streamed run with a buffered one checks
the reassembly against an object it did not produce. Everything in a reply is determined by
the request and the call's sequence number, so two runs of the same file compare equal.

Per-line controls (body fields) for streams; a fault applies to the first
``mock_stream_faults`` calls of a custom_id (default 1):

* ``mock_stream_fail_after: k`` - the connection is cut after k events;
* ``mock_stream_stall_ms: t`` - the stream pauses t ms after its first event (before event
  ``mock_stream_stall_at``, default 1; 0: before the first), sending a comment line every
  ``mock_stream_keepalive_ms`` meanwhile if that is set;
* ``mock_stream_truncate: true`` - the stream ends without its terminal event;
* ``mock_stream_error: status`` - after the first event, an error with that status (chat and
  text: ``{"error": {...}}`` as vLLM sends it; responses: ``response.failed``), then the end;
* ``mock_stream_empty: true`` - a 200 event stream with no event at all;

and, on every call: ``mock_stream_json: true`` answers JSON though asked to stream;
``mock_stream_event_ms: t`` waits t ms between events; ``mock_tool_calls: [{"name",
"arguments"}]`` and ``mock_refusal: "text"`` shape a chat reply; ``mock_tool_script: [[calls of
turn 0], [calls of turn 1], ...]`` asks for the calls of the conversation's turn (the number of
assistant messages in ``messages``: a re-sent call gets the same answer), a text reply once the
script is done (the ``/v1/responses`` loop's tests and demo).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
RESPONSES_USAGE = {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}
DONE = "[DONE]"


@dataclass
class Reply:
    """One call's reply: what the request asked for and the mock's choices for it."""

    path: str
    model: str
    text: str
    seq: int
    created: int
    n: int = 1
    logprobs: bool = False
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    refusal: str | None = None

    @classmethod
    def of(cls, path: str, body: dict[str, Any], text: str, seq: int, created: int) -> Reply:
        tools = body.get("mock_tool_calls")
        script = body.get("mock_tool_script")
        if isinstance(script, list):
            turn = _turn(body.get("messages"))
            tools = script[turn] if turn < len(script) else None
        refusal = body.get("mock_refusal")
        n = body.get("n")
        return cls(
            path=path,
            model=str(body.get("model", "")),
            text=text,
            seq=seq,
            created=created,
            n=n if isinstance(n, int) and 1 <= n <= 8 else 1,
            logprobs=bool(body.get("logprobs")),
            tool_calls=[t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else [],
            refusal=refusal if isinstance(refusal, str) else None,
        )

    def texts(self) -> list[str]:
        """The text of each choice (choice 0 the reply, the others marked with their index)."""
        return [self.text if i == 0 else f"{self.text} [{i}]" for i in range(self.n)]


def _turn(messages: Any) -> int:
    """How many assistant messages a chat conversation holds: its turn."""
    if not isinstance(messages, list):
        return 0
    return sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")


def pieces(text: str) -> list[str]:
    """The text as a server streams it: a word at a time, each with its leading space."""
    return re.findall(r"\s*\S+", text) or [text]


def _token(piece: str) -> dict[str, Any]:
    return {"token": piece, "logprob": -0.25, "bytes": list(piece.encode()), "top_logprobs": []}


def _tool_calls(reply: Reply) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_mock_{reply.seq}_{i}",
            "type": "function",
            "function": {
                "name": str(call.get("name", "tool")),
                "arguments": json.dumps(call.get("arguments", {}), separators=(",", ":")),
            },
        }
        for i, call in enumerate(reply.tool_calls)
    ]


def chat_body(reply: Reply) -> dict[str, Any]:
    choices = []
    for i, text in enumerate(reply.texts()):
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = "stop"
        if reply.refusal is not None:
            message = {"role": "assistant", "content": None, "refusal": reply.refusal}
        elif reply.tool_calls:
            message = {"role": "assistant", "content": None, "tool_calls": _tool_calls(reply)}
            finish = "tool_calls"
        logprobs = None
        if reply.logprobs and message["content"]:
            logprobs = {"content": [_token(p) for p in pieces(text)], "refusal": None}
        choices.append(
            {"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish}
        )
    return {
        "id": f"chatcmpl-mock-{reply.seq}",
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
        "usage": USAGE,
    }


def chat_events(reply: Reply, include_usage: bool) -> list[tuple[str | None, Any]]:
    head = {
        "id": f"chatcmpl-mock-{reply.seq}",
        "object": "chat.completion.chunk",
        "created": reply.created,
        "model": reply.model,
    }

    def chunk(i: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> Any:
        choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return (None, {**head, "choices": [choice]})

    out = []
    texts = reply.texts()
    for i in range(reply.n):
        first = "" if reply.refusal is None and not reply.tool_calls else None
        out.append(chunk(i, {"role": "assistant", "content": first}))
    for i, text in enumerate(texts):
        if reply.refusal is not None:
            out.extend(chunk(i, {"refusal": p}) for p in pieces(reply.refusal))
        elif reply.tool_calls:
            for j, call in enumerate(_tool_calls(reply)):
                name = call["function"]["name"]
                start = {**call, "index": j, "function": {"name": name, "arguments": ""}}
                out.append(chunk(i, {"tool_calls": [start]}))
                args = call["function"]["arguments"]
                for k in range(0, len(args), 8):
                    part = {"index": j, "function": {"arguments": args[k : k + 8]}}
                    out.append(chunk(i, {"tool_calls": [part]}))
        else:
            for p in pieces(text):
                lp = {"content": [_token(p)], "refusal": None} if reply.logprobs else None
                out.append(chunk(i, {"content": p}, lp=lp))
    finish = "tool_calls" if reply.tool_calls and reply.refusal is None else "stop"
    out.extend(chunk(i, {}, finish) for i in range(reply.n))
    if include_usage:
        out.append((None, {**head, "choices": [], "usage": USAGE}))
    out.append((None, DONE))
    return out


def _text_logprobs(parts: list[str]) -> dict[str, Any]:
    offsets = [sum(len(p) for p in parts[:k]) for k in range(len(parts))]
    return {
        "tokens": parts,
        "token_logprobs": [-0.25] * len(parts),
        "top_logprobs": [{p: -0.25} for p in parts],
        "text_offset": offsets,
    }


def text_body(reply: Reply) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "text": text,
            "logprobs": _text_logprobs(pieces(text)) if reply.logprobs else None,
            "finish_reason": "stop",
        }
        for i, text in enumerate(reply.texts())
    ]
    return {
        "id": f"cmpl-mock-{reply.seq}",
        "object": "text_completion",
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
        "usage": USAGE,
    }


def text_events(reply: Reply, include_usage: bool) -> list[tuple[str | None, Any]]:
    head = {
        "id": f"cmpl-mock-{reply.seq}",
        "object": "text_completion",
        "created": reply.created,
        "model": reply.model,
    }
    out: list[tuple[str | None, Any]] = []
    for i, text in enumerate(reply.texts()):
        parts = pieces(text)
        for k, p in enumerate(parts):
            lp = None
            if reply.logprobs:
                lp = _text_logprobs([p])
                lp["text_offset"] = [sum(len(q) for q in parts[:k])]
            choice = {"index": i, "text": p, "logprobs": lp, "finish_reason": None}
            out.append((None, {**head, "choices": [choice]}))
        done = {"index": i, "text": "", "logprobs": None, "finish_reason": "stop"}
        out.append((None, {**head, "choices": [done]}))
    if include_usage:
        out.append((None, {**head, "choices": [], "usage": USAGE}))
    out.append((None, DONE))
    return out


def _message_item(reply: Reply, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    return {
        "id": f"msg_mock_{reply.seq}",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def responses_body(reply: Reply, status: str = "completed") -> dict[str, Any]:
    done = status == "completed"
    return {
        "id": f"resp_mock_{reply.seq}",
        "object": "response",
        "created_at": reply.created,
        "status": status,
        "model": reply.model,
        "output": [_message_item(reply, "completed", reply.text)] if done else [],
        "usage": RESPONSES_USAGE if done else None,
    }


def responses_events(reply: Reply) -> list[tuple[str | None, Any]]:
    base = {"item_id": f"msg_mock_{reply.seq}", "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": reply.text, "annotations": []}
    steps: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": responses_body(reply, "in_progress")}),
        ("response.in_progress", {"response": responses_body(reply, "in_progress")}),
        (
            "response.output_item.added",
            {"output_index": 0, "item": _message_item(reply, "in_progress", None)},
        ),
        ("response.content_part.added", {**base, "part": {**part, "text": ""}}),
    ]
    steps += [("response.output_text.delta", {**base, "delta": p}) for p in pieces(reply.text)]
    steps += [
        ("response.output_text.done", {**base, "text": reply.text}),
        ("response.content_part.done", {**base, "part": part}),
        (
            "response.output_item.done",
            {"output_index": 0, "item": _message_item(reply, "completed", reply.text)},
        ),
        ("response.completed", {"response": responses_body(reply)}),
    ]
    return [
        (name, {"type": name, "sequence_number": k, **payload})
        for k, (name, payload) in enumerate(steps)
    ]


def body(reply: Reply) -> dict[str, Any]:
    """The buffered reply of the call's path (anything not text or responses: chat)."""
    if reply.path.endswith("/responses"):
        return responses_body(reply)
    if reply.path.endswith("/completions") and not reply.path.endswith("/chat/completions"):
        return text_body(reply)
    return chat_body(reply)


def events(reply: Reply, request: dict[str, Any]) -> list[tuple[str | None, Any]]:
    """The streamed reply: (event name, payload) pairs, the terminal one last."""
    options = request.get("stream_options")
    usage = isinstance(options, dict) and bool(options.get("include_usage"))
    if reply.path.endswith("/responses"):
        return responses_events(reply)
    if reply.path.endswith("/completions") and not reply.path.endswith("/chat/completions"):
        return text_events(reply, usage)
    return chat_events(reply, usage)


def error_event(reply: Reply, status: int) -> tuple[str | None, Any]:
    """An error inside the stream, with ``status``: vLLM's form, or ``response.failed``."""
    if reply.path.endswith("/responses"):
        code = "rate_limit_exceeded" if status == 429 else "server_error"
        if 400 <= status < 500 and status != 429:
            code = "invalid_prompt"
        failed = {
            **responses_body(reply, "failed"),
            "error": {"code": code, "message": f"mock error {status}"},
        }
        return ("response.failed", {"type": "response.failed", "response": failed})
    error = {"message": f"mock error {status}", "type": "mock", "code": status}
    return (None, {"error": error})


def encode(name: str | None, payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {data}\n\n".encode()


async def stream(
    request: web.Request,
    reply: Reply,
    body: dict[str, Any],
    faulty: bool,
    entry: dict[str, Any],
    headers: dict[str, str],
) -> web.StreamResponse:
    """Send ``reply`` as an event stream, with the faults ``body`` asks for when ``faulty``."""
    resp = web.StreamResponse(
        status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    resp.headers.update(headers)
    await resp.prepare(request)
    planned = events(reply, body)
    gap_s = float(body.get("mock_stream_event_ms") or 0) / 1000.0
    control = body if faulty else {}
    fail_after = control.get("mock_stream_fail_after")
    sent = 0
    if not control.get("mock_stream_empty"):
        for k, (name, payload) in enumerate(planned):
            if fail_after is not None and k == int(fail_after):
                entry["outcome"] = "cut"
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            if k == int(control.get("mock_stream_stall_at", 1)):
                await _stall(resp, control)
            if k == 1 and control.get("mock_stream_error"):
                await resp.write(encode(*error_event(reply, int(control["mock_stream_error"]))))
                sent += 1
                break
            if control.get("mock_stream_truncate") and k == len(planned) - 1:
                break
            if gap_s and k:
                await asyncio.sleep(gap_s)
            await resp.write(encode(name, payload))
            sent += 1
    entry["events"] = sent
    await resp.write_eof()
    return resp


async def _stall(resp: web.StreamResponse, control: dict[str, Any]) -> None:
    """``mock_stream_stall_ms``, with a comment line every ``mock_stream_keepalive_ms``."""
    left = float(control.get("mock_stream_stall_ms") or 0) / 1000.0
    every = float(control.get("mock_stream_keepalive_ms") or 0) / 1000.0
    while left > 0:
        step = min(left, every) if every else left
        await asyncio.sleep(step)
        left -= step
        if every:
            await resp.write(b": keep-alive\n\n")
