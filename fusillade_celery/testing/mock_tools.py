"""A mock tool server for the ``/v1/responses`` loop's demo and tests: ``POST /tools/<name>``
answers a tool call, and ``GET /_tools/stats`` tells which calls came, how often per call id,
and which were cut off by the caller (a cancel closes the connection).

asyncio (aiohttp), like the mock upstream, so slow calls cost nothing while they wait. A call
is steered by fields of its own arguments (the model chose them, so a mock upstream's
``mock_tool_script`` decides what each tool call does):

* ``mock_latency_ms: t`` - the answer comes after t ms;
* ``mock_stall_ms: t`` - the first call with this call id answers after t ms (one sent again
  after a worker died then answers at once);
* ``mock_statuses: [503, 200]`` - the n-th call with this call id gets the n-th status (the
  last one repeats); an error's body is ``{"error": "mock tool error ..."}``;
* ``mock_text: true`` - a ``text/plain`` answer instead of JSON.

A 200 answer is ``{"tool", "arguments" (without the mock fields), "call"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from typing import Any

from aiohttp import web

from ..mock_upstream import MockUpstream, _bound_port

#: What an error answer's body says: the loop must never pass it on to the model.
ERROR_BODY_MARK = "mock tool error body"


class ToolsState:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.by_call_id: Counter[str] = Counter()
        self.disconnects = 0
        self.log: list[dict[str, Any]] = []

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "by_call_id": dict(self.by_call_id),
            "disconnects": self.disconnects,
            "log": self.log,
        }

    def calls_of(self, tool: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e["tool"] == tool]


TOOLS_KEY: web.AppKey[ToolsState] = web.AppKey("tools")


def build_tools_app() -> web.Application:
    state = ToolsState()
    app = web.Application()
    app[TOOLS_KEY] = state

    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            args = json.loads(raw) if raw else {}
        except ValueError:
            args = {}
        if not isinstance(args, dict):
            args = {"value": args}
        call_id = request.headers.get("X-Fusillade-Tool-Call-Id", "")
        state.calls += 1
        state.by_call_id[call_id] += 1
        call = state.by_call_id[call_id]
        entry: dict[str, Any] = {
            "tool": request.match_info["name"],
            "call_id": call_id,
            "call": call,
            "request_id": request.headers.get("X-Fusillade-Request-Id"),
            "authorization": request.headers.get("Authorization"),
            "arguments": args,
            "start": time.time(),
        }
        state.log.append(entry)
        try:
            latency = float(args.get("mock_latency_ms", 0) or 0)
            if call == 1 and args.get("mock_stall_ms"):
                latency = float(args["mock_stall_ms"])
            if latency:
                await asyncio.sleep(latency / 1000.0)
            statuses = args.get("mock_statuses") or [200]
            status = int(statuses[min(call, len(statuses)) - 1])
            entry["status"] = status
            entry["outcome"] = "ok"
            if status >= 300:
                error = {"error": f"{ERROR_BODY_MARK} ({status})"}
                return web.json_response(error, status=status)
            shown = {k: v for k, v in args.items() if not k.startswith("mock_")}
            if args.get("mock_text"):
                return web.Response(text=f"{entry['tool']} says {json.dumps(shown)}")
            return web.json_response({"tool": entry["tool"], "arguments": shown, "call": call})
        except (asyncio.CancelledError, ConnectionResetError):
            entry["outcome"] = "disconnected"
            state.disconnects += 1
            raise
        finally:
            entry["end"] = time.time()

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(state.stats())

    async def reset(request: web.Request) -> web.Response:
        state.reset()
        return web.json_response({"ok": True})

    app.router.add_get("/_tools/stats", stats)
    app.router.add_post("/_tools/reset", reset)
    app.router.add_post("/tools/{name}", handle)
    return app


class MockTools(MockUpstream):
    """The mock tool server in a background thread of this process: ``url_for(name)`` is a
    tool's URL for ``FUSILLADE_TOOLS``."""

    def _build(self) -> web.Application:
        return build_tools_app()

    @property
    def tools(self) -> ToolsState:
        assert self.app is not None
        return self.app[TOOLS_KEY]

    def url_for(self, name: str) -> str:
        return f"{self.url}/tools/{name}"


def serve_tools(host: str, port: int) -> None:
    """Run in the foreground (``fusillade-celery mock-tools``); prints the URL first."""

    async def main() -> None:
        runner = web.AppRunner(build_tools_app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        print(f"mock tools listening on http://{host}:{_bound_port(site)}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
