"""``FUSILLADE_TOOLS``: the server-side tools of the ``/v1/responses`` loop and which models
see them. Parsed once with the other settings, so a typo stops a process at start with one
line naming the variable rather than surfacing as a model that never calls its tool.

The form (JSON, or ``@path`` to a file)::

    {"tools": [{"name": "get_weather", "kind": "http", "url": "http://tools:9000/weather",
                "description": "...", "parameters": {JSON Schema},
                "api_key_env": "WEATHER_KEY", "timeout_ms": 10000, "idempotent": true},
               {"name": "researcher", "kind": "agent", "model": "small", "instructions": "...",
                "tools": ["get_weather"], "description": "...", "body": {"temperature": 0}}],
     "models": {"gpt-4o": ["get_weather", "researcher"], "*": []}}

A bare list is ``{"tools": [...]}``. Without ``models`` every model sees every tool; with it, a
listed model sees its list and the others see the ``"*"`` entry (all tools if there is none).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("http", "agent")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI accepts as a function name
_COMMON = {"name", "kind", "description", "parameters"}
_KEYS = {
    "http": _COMMON | {"url", "api_key_env", "timeout_ms", "idempotent"},
    "agent": _COMMON | {"model", "instructions", "tools", "body"},
}
#: An agent's arguments when its config gives none: the task, as text.
AGENT_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string", "description": "the task for the agent"}},
    "required": ["input"],
}
DEFAULT_TOOL_TIMEOUT_MS = 30000


@dataclass(frozen=True)
class Tool:
    """One server-side tool. ``parameters`` and ``body`` are JSON text (the object stays
    hashable and immutable); the key is read from ``api_key_env`` at start and never shown."""

    name: str
    kind: str
    description: str = ""
    parameters: str = '{"type":"object","properties":{}}'
    url: str = ""
    api_key: str = field(default="", repr=False)
    timeout_ms: int = DEFAULT_TOOL_TIMEOUT_MS
    idempotent: bool = False
    model: str = ""
    instructions: str = ""
    tools: tuple[str, ...] = ()
    body: str = "{}"

    def function(self) -> dict[str, Any]:
        """The chat-completions function tool the model is offered."""
        spec: dict[str, Any] = {"name": self.name, "parameters": json.loads(self.parameters)}
        if self.description:
            spec["description"] = self.description
        return {"type": "function", "function": spec}


@dataclass(frozen=True)
class ToolConfig:
    """Every configured tool by name, and the tool names each model sees (None: all)."""

    tools: tuple[Tool, ...] = ()
    models: tuple[tuple[str, tuple[str, ...]], ...] = ()
    default: tuple[str, ...] | None = None

    def __bool__(self) -> bool:
        return bool(self.tools)

    def get(self, name: str) -> Tool | None:
        for tool in self.tools:
            if tool.name == name:
                return tool
        return None

    def for_model(self, model: str) -> tuple[str, ...]:
        """The names of the tools ``model`` is offered at the top level of its loop."""
        for name, names in self.models:
            if name == model:
                return names
        if self.default is not None:
            return self.default
        return tuple(t.name for t in self.tools)

    def describe(self) -> str:
        """What ``fusillade-celery settings`` prints: names and kinds, never a key."""
        return ",".join(f"{t.name}({t.kind})" for t in self.tools)


def parse_tools(raw: str) -> ToolConfig:
    """``FUSILLADE_TOOLS`` (JSON or ``@file``) -> ``ToolConfig``; ``ValueError`` (one line) on
    anything that does not fit."""
    text = Path(raw[1:]).read_text() if raw.startswith("@") else raw
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if isinstance(data, list):
        data = {"tools": data}
    if not isinstance(data, dict) or set(data) - {"tools", "models"}:
        raise ValueError('expected {"tools": [...], "models": {...}} or a list of tools')
    specs = data.get("tools") or []
    if not isinstance(specs, list):
        raise ValueError("'tools' must be a list")
    tools = [_tool(spec, i) for i, spec in enumerate(specs)]
    names = [t.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"tool {dup!r} is defined twice")
    for tool in tools:
        _known(tool.tools, names, f"tool {tool.name!r}: 'tools'")
    models = data.get("models")
    per_model: list[tuple[str, tuple[str, ...]]] = []
    default = None
    if models is not None:
        if not isinstance(models, dict):
            raise ValueError("'models' must be an object of model -> [tool names]")
        for model, listed in models.items():
            where = f"models[{model!r}]"
            if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
                raise ValueError(f"{where} must be a list of tool names")
            _known(listed, names, where)
            if model == "*":
                default = tuple(listed)
            else:
                per_model.append((model, tuple(listed)))
    return ToolConfig(tuple(tools), tuple(per_model), default)


def _known(listed: Any, names: list[str], where: str) -> None:
    unknown = [n for n in listed if n not in names]
    if unknown:
        raise ValueError(f"{where} names unknown tool {unknown[0]!r}")


def _tool(spec: Any, index: int) -> Tool:
    if not isinstance(spec, dict):
        raise ValueError(f"tools[{index}] must be an object")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"tools[{index}]: 'name' must match [A-Za-z0-9_-]{{1,64}}")

    def bad(why: str) -> ValueError:
        return ValueError(f"tool {name!r}: {why}")

    kind = spec.get("kind", "http")
    if kind not in KINDS:
        raise bad(f"'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    extra = sorted(set(spec) - _KEYS[kind])
    if extra:
        raise bad(f"unknown field {extra[0]!r} for a {kind} tool")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise bad("'description' must be text")
    parameters = spec.get("parameters", AGENT_PARAMETERS if kind == "agent" else None)
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise bad("'parameters' must be a JSON Schema object")
    common = {
        "name": name,
        "kind": kind,
        "description": description,
        "parameters": json.dumps(parameters, separators=(",", ":")),
    }
    if kind == "http":
        return _http_tool(spec, common, bad)
    model = spec.get("model")
    if not isinstance(model, str) or not model:
        raise bad("an agent needs a 'model'")
    instructions = spec.get("instructions", "")
    listed = spec.get("tools", [])
    body = spec.get("body", {})
    if not isinstance(instructions, str):
        raise bad("'instructions' must be text")
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise bad("'tools' must be a list of tool names")
    if not isinstance(body, dict) or {"model", "messages", "tools"} & set(body):
        raise bad("'body' must be an object of extra fields (not model, messages or tools)")
    return Tool(
        **common,
        model=model,
        instructions=instructions,
        tools=tuple(listed),
        body=json.dumps(body, separators=(",", ":")),
    )


def _http_tool(spec: dict[str, Any], common: dict[str, Any], bad: Any) -> Tool:
    from .settings import _http_url  # the same URL check as the routes'

    url = spec.get("url")
    if not isinstance(url, str):
        raise bad("an http tool needs a 'url'")
    try:
        url = _http_url(url)
    except ValueError as exc:
        raise bad(str(exc)) from None
    timeout = spec.get("timeout_ms", DEFAULT_TOOL_TIMEOUT_MS)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
        raise bad("'timeout_ms' must be a positive integer")
    idempotent = spec.get("idempotent", False)
    if not isinstance(idempotent, bool):
        raise bad("'idempotent' must be true or false")
    key_env = spec.get("api_key_env", "")
    if not isinstance(key_env, str):
        raise bad("'api_key_env' must be the name of an environment variable")
    return Tool(
        **common,
        url=url,
        api_key=os.environ.get(key_env, "") if key_env else "",
        timeout_ms=timeout,
        idempotent=idempotent,
    )
