"""Streamed replies reassembled into the object a buffered call returns, from event bytes:
the three formats (tool-call deltas, refusal, logprobs, cumulative usage), the event syntax
(split lines, CR/LF, comments), in-stream errors and the statuses they stand for, and which
requests are streamed with what body."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest

from fusillade_celery import sse
from fusillade_celery.reassemble import (
    ASSEMBLERS,
    BrokenStream,
    ErrorEvent,
    error_status,
)


def sse_bytes(*events: Any, event_names: Iterable[str | None] | None = None) -> bytes:
    names = list(event_names) if event_names is not None else [None] * len(events)
    out = b""
    for name, payload in zip(names, events, strict=True):
        data = payload if isinstance(payload, str) else json.dumps(payload)
        out += (f"event: {name}\n" if name else "").encode() + f"data: {data}\n\n".encode()
    return out


def reassemble(kind: str, raw: bytes, split: int | None = None) -> dict[str, Any]:
    """Feed ``raw`` to the assembler of ``kind`` in pieces of ``split`` bytes (one piece:
    None); the terminal event must come."""
    pieces = [raw] if split is None else [raw[i : i + split] for i in range(0, len(raw), split)]
    assembler = ASSEMBLERS[kind]()
    for event, data in sse.events(pieces):
        if assembler.feed(event, data):
            return assembler.result()
    raise AssertionError("no terminal event")


HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}


def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {**HEAD, "choices": choices, **extra}


def tok(text: str) -> dict[str, Any]:
    return {"token": text, "logprob": -0.5, "bytes": list(text.encode()), "top_logprobs": []}


def args(choice: int, tool: int, arguments: str, **call: Any) -> dict[str, Any]:
    """A chat chunk carrying one tool call's arguments delta."""
    delta = {"index": tool, **call, "function": {"arguments": arguments}}
    return chunk([{"index": choice, "delta": {"tool_calls": [delta]}}])


def lp(token: str, offset: int) -> dict[str, Any]:
    return {
        "tokens": [token],
        "token_logprobs": [-1.0],
        "top_logprobs": [{token: -1.0}],
        "text_offset": [offset],
    }


def test_chat_choices_by_index_with_tool_calls_refusal_logprobs_and_the_last_usage() -> None:
    """Two choices interleaved: choice 0 writes text with logprobs, choice 1 calls two tools
    whose argument deltas arrive by index, mixed; usage is cumulative (never summed)."""
    start = [
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get"}},
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "put"}},
    ]
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    raw = sse_bytes(
        chunk([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None}}]),
        chunk([{"index": 1, "delta": {"role": "assistant", "content": None}}]),
        chunk([{"index": 0, "delta": {"content": "Hel"}, "logprobs": {"content": [tok("Hel")]}}]),
        chunk([{"index": 1, "delta": {"tool_calls": start}}], usage=usage),
        args(1, 1, '{"k'),
        args(1, 0, '{"a":'),
        chunk([{"index": 0, "delta": {"content": "lo"}, "logprobs": {"content": [tok("lo")]}}]),
        args(1, 1, '":2}'),
        args(1, 0, "1}", id="call_a"),  # some servers repeat the id: not concatenated
        chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        chunk([{"index": 1, "delta": {}, "finish_reason": "tool_calls"}]),
        chunk([], usage={**usage, "completion_tokens": 9, "total_tokens": 12}),
        "[DONE]",
    )
    out = reassemble("chat", raw, split=7)
    assert out == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 7,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None},
                "logprobs": {"content": [tok("Hel"), tok("lo")]},
                "finish_reason": "stop",
            },
            {
                "index": 1,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "get", "arguments": '{"a":1}'},
                        },
                        {
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "put", "arguments": '{"k":2}'},
                        },
                    ],
                },
                "finish_reason": "tool_calls",
            },
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12},
    }


def test_chat_refusal_is_concatenated_and_the_role_set_once() -> None:
    raw = sse_bytes(
        chunk([{"index": 0, "delta": {"role": "assistant", "content": None}, "logprobs": None}]),
        chunk([{"index": 0, "delta": {"role": "assistant", "refusal": "I can"}}]),
        chunk([{"index": 0, "delta": {"refusal": "'t."}, "logprobs": {"refusal": [{"t": 1}]}}]),
        chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}], system_fingerprint="fp"),
        "[DONE]",
    )
    (choice,) = reassemble("chat", raw)["choices"]
    assert choice["message"] == {"role": "assistant", "content": None, "refusal": "I can't."}
    assert choice["logprobs"] == {"refusal": [{"t": 1}]}
    assert reassemble("chat", raw)["system_fingerprint"] == "fp"


def test_a_legacy_function_call_is_merged_like_a_tool_call() -> None:
    raw = sse_bytes(
        chunk([{"index": 0, "delta": {"role": "assistant", "function_call": {"name": "f"}}}]),
        chunk([{"index": 0, "delta": {"function_call": {"arguments": '{"a"'}}}]),
        chunk([{"index": 0, "delta": {"function_call": {"name": "f", "arguments": ":1}"}}}]),
        chunk([{"index": 0, "delta": {}, "finish_reason": "function_call"}]),
        "[DONE]",
    )
    (choice,) = reassemble("chat", raw)["choices"]
    assert choice["message"]["function_call"] == {"name": "f", "arguments": '{"a":1}'}


def test_text_completion_text_and_logprob_lists_are_joined() -> None:
    head = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m"}

    def text(piece: str, logprobs: Any, finish: str | None = None, **more: Any) -> Any:
        choice = {"index": 0, "text": piece, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "choices": [{**choice, **more}]}

    raw = sse_bytes(
        text("ab", lp("ab", 0)),
        text("c", lp("c", 2)),
        text("", None, "length", stop_reason=None),
        {**head, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
        "[DONE]",
    )
    assert reassemble("text", raw, split=5) == {
        **head,
        "choices": [
            {
                "index": 0,
                "text": "abc",
                "logprobs": {
                    "tokens": ["ab", "c"],
                    "token_logprobs": [-1.0, -1.0],
                    "top_logprobs": [{"ab": -1.0}, {"c": -1.0}],
                    "text_offset": [0, 2],
                },
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
    }


def test_responses_body_is_the_response_of_response_completed() -> None:
    final = {"id": "resp_1", "object": "response", "status": "completed", "output": [1]}
    names = ["response.created", "response.output_text.delta", "response.completed"]
    raw = sse_bytes(
        {"type": names[0], "response": {"id": "resp_1", "status": "in_progress"}},
        {"type": names[1], "delta": "x"},
        {"type": names[2], "response": final},
        event_names=names,
    )
    assert reassemble("responses", raw, split=3) == final
    incomplete = {**final, "status": "incomplete"}
    raw = sse_bytes({"type": "response.incomplete", "response": incomplete})
    assert reassemble("responses", raw) == incomplete  # a buffered call returns it with 200


@pytest.mark.parametrize(
    ("kind", "payload", "status"),
    [
        ("chat", {"error": {"object": "error", "message": "bad", "code": 400}}, 400),  # vLLM
        ("chat", {"object": "error", "message": "busy", "type": "x", "code": 503}, 503),
        ("text", {"error": {"message": "slow down", "code": "rate_limit_exceeded"}}, 429),
        ("chat", {"error": {"message": "?"}}, 500),
        (
            "responses",
            {"type": "response.failed", "response": {"error": {"code": "server_error"}}},
            500,
        ),
        ("responses", {"type": "error", "code": "invalid_prompt", "message": "no"}, 400),
        ("responses", {"type": "error", "code": "429", "message": "no"}, 429),
    ],
)
def test_an_error_inside_the_stream_carries_the_status_it_stands_for(
    kind: str, payload: dict[str, Any], status: int
) -> None:
    first = {"type": "response.created"} if kind == "responses" else chunk([])
    with pytest.raises(ErrorEvent) as caught:
        reassemble(kind, sse_bytes(first, payload))
    assert caught.value.status == status
    assert "code" in caught.value.body or "error" in caught.value.body


def test_error_status_reads_numeric_codes_then_names() -> None:
    assert error_status({"code": 502}) == 502
    assert error_status({"code": "404"}) == 404
    assert error_status({"code": True}) == 500  # not a number
    assert error_status({"code": None, "type": "invalid_request_error"}) == 400
    assert error_status({"code": "context_length_exceeded"}) == 400
    assert error_status("oops") == 500


def test_done_with_nothing_before_it_is_an_empty_stream() -> None:
    with pytest.raises(BrokenStream, match="empty stream"):
        reassemble("chat", sse_bytes("[DONE]"))


@pytest.mark.parametrize(
    "data", [b"{not json", b'"a string"', b"[1, 2]"], ids=["garbage", "string", "list"]
)
def test_an_event_that_is_not_a_json_object_is_a_broken_stream(data: bytes) -> None:
    assembler = ASSEMBLERS["chat"]()
    with pytest.raises(BrokenStream):
        assembler.feed(b"", data)


def test_events_split_anywhere_with_crlf_cr_comments_and_multiline_data() -> None:
    raw = (
        b": a comment, not an event\r\n\r\n"
        b"event: one\r\ndata: a\r\ndata: b\r\nid: 1\r\nretry: 5\r\n\r\n"
        b"data:no-space\r\r"
        b"data: last, unterminated"
    )
    expected = [(b"one", b"a\nb"), (b"", b"no-space"), (b"", b"last, unterminated")]
    for size in (1, 2, 3, len(raw)):
        pieces = [raw[i : i + size] for i in range(0, len(raw), size)]
        assert list(sse.events(pieces)) == expected, size


PATH = "/v1/chat/completions"
ON = frozenset({PATH})


@pytest.mark.parametrize(
    ("path", "body", "route", "endpoints", "expected"),
    [
        (PATH, '{"model":"m"}', None, frozenset(), None),  # the hot path: as it is
        (PATH, '{"model":"m"}', None, ON, True),
        (PATH, '{"model":"m","stream":true}', None, frozenset(), True),  # the caller asks
        (PATH, '{"model":"m","stream":false}', None, frozenset(), None),
        (PATH, '{"model":"m","content":"the \\"stream\\" word"}', None, frozenset(), None),
        (PATH, '{"model":"m"}', True, frozenset(), True),  # the route says so
        (PATH, '{"model":"m"}', False, ON, None),  # ... or not
        (PATH, '{"model":"m","stream":true}', False, frozenset(), False),  # un-streamed
        ("/v1/embeddings", '{"model":"m","stream":true}', None, frozenset(), None),
        ("/v1/embeddings", '{"model":"m"}', True, frozenset(), None),
    ],
)
def test_which_requests_are_streamed(
    path: str, body: str, route: bool | None, endpoints: frozenset[str], expected: bool | None
) -> None:
    assert sse.streams(path, body, route, endpoints) is expected


def test_a_streamed_body_asks_for_usage_and_keeps_the_callers_stream_options() -> None:
    body = '{"model":"m","stream_options":{"continuous_usage_stats":true},"messages":[]}'
    sent = json.loads(sse.with_stream(body, PATH, True))
    assert sent["stream"] is True
    assert sent["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    responses = json.loads(sse.with_stream('{"model":"m"}', "/v1/responses", True))
    assert responses["stream"] is True and "stream_options" not in responses
    plain = json.loads(sse.with_stream(body, PATH, False))
    assert plain["stream"] is False and "stream_options" not in plain
