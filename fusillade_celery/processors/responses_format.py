"""Translation between the Responses API and chat completions for the ``/v1/responses`` loop
(``responses_loop.py``): a Responses request becomes a chat conversation, and the chat replies
of the loop's steps become one assembled Response object.

Why chat completions: every OpenAI-compatible server (vLLM, SGLang, gateways) has it, and it
replays a whole conversation with the tool calls' real ids, which is what a loop that may be
resumed on another worker needs. Pure functions, unit-tested on their own.
"""

from __future__ import annotations

import json
from typing import Any

CHAT_PATH = "/v1/chat/completions"

#: Responses fields the loop reads itself or that have no chat equivalent (dropped); every
#: other field (temperature, top_p, seed, stream, a server's own extras) passes through.
_HANDLED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "max_output_tokens",
        "text",
        "reasoning",
        "store",
        "include",
        "truncation",
        "background",
        "metadata",
        "max_tool_calls",
        "stream_options",
        "service_tier",
    }
)
#: Fields that need state the batch does not have (a stored response or prompt).
_REFUSED = ("previous_response_id", "conversation", "prompt")


class Unsupported(ValueError):
    """A request the loop cannot translate: it fails as a ``builder_error`` (not retried)."""


class BadReply(ValueError):
    """A model reply with no usable message: the loop cannot go on."""


def translate(body: dict[str, Any], server_tools: frozenset[str]) -> tuple[list[Any], Any]:
    """(messages, the chat fields to send with every call of the top level: the caller's
    tools as chat function tools, ``tool_choice``, ``max_tokens``, ``response_format``,
    ``reasoning_effort``, and what passes through). ``server_tools``: names the caller may
    not reuse for its own functions (a call could not be told apart)."""
    for name in _REFUSED:
        if body.get(name) is not None:
            raise Unsupported(f"'{name}' is not supported in a batch")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions:
        if not isinstance(instructions, str):
            raise Unsupported("'instructions' must be text")
        messages.append({"role": "system", "content": instructions})
    messages += input_messages(body.get("input"))
    extra = {k: v for k, v in body.items() if k not in _HANDLED and k not in _REFUSED}
    tools = [chat_tool(t) for t in body.get("tools") or []]
    clash = [t["function"]["name"] for t in tools if t["function"]["name"] in server_tools]
    if clash:
        raise Unsupported(f"the caller's tool {clash[0]!r} has the name of a server-side tool")
    if tools:
        extra["tools"] = tools
    if body.get("tool_choice") is not None:
        extra["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("max_output_tokens") is not None:
        extra["max_tokens"] = body["max_output_tokens"]
    text = body.get("text")
    if isinstance(text, dict) and isinstance(text.get("format"), dict):
        fmt = text["format"]
        if fmt.get("type") == "json_schema":
            schema = {k: v for k, v in fmt.items() if k != "type"}
            extra["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif fmt.get("type") == "json_object":
            extra["response_format"] = {"type": "json_object"}
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort"):
        extra["reasoning_effort"] = reasoning["effort"]
    return messages, extra


def input_messages(value: Any) -> list[dict[str, Any]]:
    """The Responses ``input`` as chat messages: a string is one user message; ``message``
    items keep their role and parts; ``function_call`` items join the assistant message
    before them as ``tool_calls`` (or start one); ``function_call_output`` items become
    ``tool`` messages; reasoning items are dropped."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise Unsupported("'input' must be text or a list of items")
    out: list[dict[str, Any]] = []
    for item in value:
        if not isinstance(item, dict):
            raise Unsupported("each 'input' item must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise Unsupported(f"unknown message role {role!r}")
            out.append(
                {"role": "system" if role == "developer" else role, "content": _content(item)}
            )
        elif kind == "function_call":
            call = {
                "id": _text(item, "call_id"),
                "type": "function",
                "function": {"name": _text(item, "name"), "arguments": item.get("arguments", "")},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            if not isinstance(output, str):
                output = json.dumps(output, ensure_ascii=False)
            out.append({"role": "tool", "tool_call_id": _text(item, "call_id"), "content": output})
        elif kind != "reasoning":
            raise Unsupported(f"input items of type {kind!r} are not supported")
    return out


def _text(item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise Unsupported(f"a {item.get('type')} item needs '{key}'")
    return value


def _content(item: dict[str, Any]) -> Any:
    """A message's content: text as is; parts as chat parts (one text part: its text)."""
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Unsupported("a message's 'content' must be text or a list of parts")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "refusal":
            parts.append({"type": "text", "text": part.get("refusal", "")})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image = {"url": part["image_url"]}
            if part.get("detail"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_file":
            fields = ("file_data", "file_id", "filename")
            parts.append({"type": "file", "file": {k: part[k] for k in fields if k in part}})
        else:
            raise Unsupported(f"message parts of type {kind!r} are not supported")
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def chat_tool(tool: Any) -> dict[str, Any]:
    """A Responses function tool as a chat function tool (other tool types cannot be run
    by the loop: they are refused rather than silently dropped)."""
    if not isinstance(tool, dict) or tool.get("type") != "function" or not tool.get("name"):
        kind = tool.get("type") if isinstance(tool, dict) else tool
        raise Unsupported(f"tools of type {kind!r} are not supported (only function tools)")
    spec = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": spec}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise Unsupported(f"tool_choice {choice!r} is not supported")


def reply_message(reply: Any) -> dict[str, Any]:
    """The assistant message of a chat reply (its first choice), each tool call with an id
    (made from the reply's when a server gives none, the same on every read)."""
    try:
        choice = reply["choices"][0]
        message = dict(choice["message"])
    except (KeyError, IndexError, TypeError):
        raise BadReply("the model's reply has no message") from None
    calls = []
    for i, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadReply("the model's reply has a tool call without a function name")
        arguments = function.get("arguments")
        calls.append(
            {
                "id": call.get("id") or f"call_{reply.get('id', 'x')}_{i}",
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments or "{}"},
            }
        )
    message["tool_calls"] = calls
    message["finish_reason"] = choice.get("finish_reason")
    return message


def assistant_message(message: dict[str, Any]) -> dict[str, Any]:
    """The reply as the conversation replays it: content and tool calls, with their ids."""
    out: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message["tool_calls"]:
        out["tool_calls"] = message["tool_calls"]
    return out


def message_item(reply: dict[str, Any], message: dict[str, Any]) -> dict[str, Any] | None:
    """The Responses ``message`` output item of a reply's text (None when it has none)."""
    text, refusal = message.get("content"), message.get("refusal")
    if refusal:
        content = [{"type": "refusal", "refusal": refusal}]
    elif text:
        content = [{"type": "output_text", "text": text, "annotations": []}]
    else:
        return None
    return {
        "id": f"msg_{reply.get('id', '')}",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": content,
    }


def function_call_item(call: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"fc_{call['id']}",
        "type": "function_call",
        "status": "completed",
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
    }


def function_output_item(call_id: str, output: str) -> dict[str, Any]:
    return {
        "id": f"fco_{call_id}",
        "type": "function_call_output",
        "status": "completed",
        "call_id": call_id,
        "output": output,
    }


def add_usage(total: dict[str, int], reply: Any) -> None:
    """Add a chat reply's usage to the Response's (a reply without one adds nothing)."""
    usage = reply.get("usage") if isinstance(reply, dict) else None
    if not isinstance(usage, dict):
        return
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    total["input_tokens"] += prompt
    total["output_tokens"] += completion
    total["total_tokens"] += int(usage.get("total_tokens") or prompt + completion)


def response_object(
    response_id: str,
    created_at: float,
    body: dict[str, Any],
    model: str,
    output: list[dict[str, Any]],
    usage: dict[str, int],
    finish_reason: str | None,
) -> dict[str, Any]:
    """The assembled Response: ``incomplete`` when the last reply was cut short."""
    incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}
    reason = incomplete.get(finish_reason or "")
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(created_at),
        "status": "incomplete" if reason else "completed",
        "error": None,
        "incomplete_details": {"reason": reason} if reason else None,
        "instructions": body.get("instructions"),
        "model": model,
        "output": output,
        "metadata": body.get("metadata") or {},
        "usage": usage,
    }
