"""The ``/v1/responses`` loop's translation (Responses request -> chat conversation, chat
replies -> Response items) and the ``FUSILLADE_TOOLS`` setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusillade_celery.processors import responses_format as fmt
from fusillade_celery.settings import ConfigError, Settings
from fusillade_celery.toolconfig import parse_tools


def test_a_string_input_with_instructions_is_a_system_and_a_user_message() -> None:
    messages, fields = fmt.translate(
        {"model": "m", "input": "hi", "instructions": "be brief", "temperature": 0.2}, frozenset()
    )
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert fields == {"temperature": 0.2}  # passes through; model and input do not


def test_items_become_messages_with_function_calls_folded_and_real_ids_kept() -> None:
    items = [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"x":1}'},
        {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "one"},
        {"type": "function_call_output", "call_id": "call_2", "output": {"n": 2}},
        {"type": "reasoning", "summary": []},
        {"type": "function_call", "call_id": "call_3", "name": "f", "arguments": "{}"},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "look"},
                {"type": "input_image", "image_url": "https://x/i.png", "detail": "low"},
            ],
        },
    ]
    assert fmt.input_messages(items) == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "a",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"x":1}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "one"},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"n": 2}'},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_3", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "https://x/i.png", "detail": "low"}},
            ],
        },
    ]


def test_the_callers_tools_and_options_are_translated() -> None:
    body = {
        "model": "m",
        "input": "hi",
        "tools": [{"type": "function", "name": "mine", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "mine"},
        "max_output_tokens": 50,
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
        "reasoning": {"effort": "low"},
        "store": True,
        "metadata": {"k": "v"},
        "top_k": 5,
    }
    _, fields = fmt.translate(body, frozenset({"server_tool"}))
    assert fields == {
        "tools": [
            {"type": "function", "function": {"name": "mine", "parameters": {"type": "object"}}}
        ],
        "tool_choice": {"type": "function", "function": {"name": "mine"}},
        "max_tokens": 50,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": {"type": "object"}},
        },
        "reasoning_effort": "low",
        "top_k": 5,
    }


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": 5}, "'input' must be text or a list"),
        ({"input": [{"type": "web_search_call"}]}, "type 'web_search_call'"),
        ({"input": "x", "tools": [{"type": "web_search_preview"}]}, "only function tools"),
        ({"input": "x", "tools": [{"type": "function", "name": "lookup"}]}, "server-side"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "needs 'call_id'"),
        ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input_audio"),
    ],
)
def test_what_the_loop_cannot_translate_is_refused(body: dict, says: str) -> None:
    with pytest.raises(fmt.Unsupported, match=says):
        fmt.translate(body, frozenset({"lookup"}))


def test_reply_messages_get_stable_ids_and_items() -> None:
    reply = {
        "id": "chatcmpl-9",
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": "thinking",
                    "tool_calls": [{"function": {"name": "f", "arguments": ""}}],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    message = fmt.reply_message(reply)
    assert message == fmt.reply_message(reply)  # the same ids on every read (a resume)
    (call,) = message["tool_calls"]
    assert call == {
        "id": "call_chatcmpl-9_0",
        "type": "function",
        "function": {"name": "f", "arguments": "{}"},
    }
    assert fmt.assistant_message(message) == {
        "role": "assistant",
        "content": "thinking",
        "tool_calls": [call],
    }
    assert fmt.function_call_item(call)["call_id"] == "call_chatcmpl-9_0"
    assert fmt.message_item(reply, message)["content"][0]["text"] == "thinking"  # type: ignore[index]
    usage = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
    fmt.add_usage(usage, reply)
    fmt.add_usage(usage, {"id": "no usage"})
    assert usage == {"input_tokens": 4, "output_tokens": 5, "total_tokens": 9}
    with pytest.raises(fmt.BadReply):
        fmt.reply_message({"choices": []})


TOOLS = [
    {"name": "lookup", "url": "http://tools:9/lookup", "idempotent": True, "api_key_env": "TK"},
    {"name": "helper", "kind": "agent", "model": "small", "tools": ["lookup"]},
]


def test_the_tools_setting_parses_with_per_model_visibility(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TK", "sk-tool-SECRET")
    path = tmp_path / "tools.json"
    path.write_text(json.dumps({"tools": TOOLS, "models": {"big": ["helper"], "*": []}}))
    s = Settings.from_env({"FUSILLADE_TOOLS": f"@{path}"})
    lookup = s.tools.get("lookup")
    assert lookup is not None and lookup.api_key == "sk-tool-SECRET" and lookup.idempotent
    assert s.tools.for_model("big") == ("helper",) and s.tools.for_model("other") == ()
    helper = s.tools.get("helper")
    assert helper is not None and json.loads(helper.parameters)["required"] == ["input"]
    assert "SECRET" not in repr(s) and "SECRET" not in repr(s.tools)
    assert parse_tools(json.dumps(TOOLS)).for_model("any") == ("lookup", "helper")


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("{nope", "not JSON"),
        ('[{"name": "a b", "url": "http://x"}]', "'name' must match"),
        ('[{"name": "a", "kind": "mcp"}]', "'kind' must be one of http, agent"),
        ('[{"name": "a"}]', "an http tool needs a 'url'"),
        ('[{"name": "a", "url": "http://x", "timout_ms": 5}]', "unknown field 'timout_ms'"),
        ('[{"name": "a", "url": "http://x", "timeout_ms": 0}]', "'timeout_ms' must be"),
        ('[{"name": "a", "kind": "agent"}]', "an agent needs a 'model'"),
        ('[{"name": "a", "kind": "agent", "model": "m", "tools": ["b"]}]', "unknown tool 'b'"),
        ('[{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]', "twice"),
        ('{"tools": [], "models": {"m": ["zz"]}}', "models['m'] names unknown tool 'zz'"),
    ],
)
def test_a_bad_tools_setting_is_one_line_naming_the_variable(raw: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"FUSILLADE_TOOLS": raw})
    message = str(caught.value)
    assert message.startswith("FUSILLADE_TOOLS: ") and says in message and "\n" not in message
