"""An OpenAI-compatible mock upstream for the demo, the tests and the benchmarks.

asyncio (aiohttp) so that one process holds thousands of slow requests open, the way a
latency-bound inference server does. Behaviour is set globally by flags, or per request by
``mock_*`` fields in the request body, so one server can play many scenarios at once:

* ``mock_statuses: [503, 503, 200]`` - the n-th call for this custom_id gets the n-th status
  (the last one repeats);
* ``mock_reset: n`` - the first n calls for this custom_id are answered by closing the socket;
* ``mock_stall_ms: t`` - the first call for this custom_id waits t ms before answering;
* ``mock_latency_ms: t`` - every call for this custom_id takes t ms (before its first byte);
* ``"stream": true`` - the reply is streamed as Server-Sent Events, in the format of the path
  (chat, text completion, responses), with the stream faults of ``mock_stream.py``.

Replies are deterministic: the same request gets the same text, ids numbered by the mock's
call sequence, and ``created`` the time the mock started.

``GET /_mock/stats`` reports calls, per-model peak concurrency, and (unless ``--no-log`` or
``?log=0``) a log of calls with their timing and the ``x-fusillade-*`` / ``authorization``
headers seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

from . import mock_stream

LOGGED_HEADER_PREFIXES = ("x-fusillade-", "authorization")


@dataclass
class MockConfig:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    statuses: list[int] = field(default_factory=list)  # global sequence per custom_id
    fail_rate: float = 0.0  # random failures ...
    fail_status: int = 503  # ... with this status
    reset_rate: float = 0.0  # random connection resets
    log_calls: bool = True
    max_log: int = 200_000


class MockState:
    def __init__(self, config: MockConfig):
        self.config = config
        self.created = int(time.time())
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.by_custom_id: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.disconnects = 0
        self.log: list[dict[str, Any]] = []
        self.seq = 0
        self.first_call_at: float | None = None

    def stats(self, log: bool = True) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "by_custom_id": dict(self.by_custom_id),
            "in_flight": {k: v for k, v in self.in_flight.items() if v},
            "peak_concurrency": dict(self.peak),
            "disconnects": self.disconnects,
            "first_call_at": self.first_call_at,
            "log": self.log if self.config.log_calls and log else [],
        }


STATE_KEY: web.AppKey[MockState] = web.AppKey("state")


def _response_body(path: str, model: str, reply: mock_stream.Reply) -> dict[str, Any]:
    if path.endswith("/embeddings"):
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "model": model,
            "usage": {"prompt_tokens": 3, "total_tokens": 3},
        }
    return mock_stream.body(reply)


def build_app(config: MockConfig) -> web.Application:
    state = MockState(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state

    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        custom_id = request.headers.get("X-Fusillade-Custom-Id", "")
        model = str(body.get("model", ""))
        state.calls += 1
        state.seq += 1
        seq = state.seq
        if state.first_call_at is None:
            state.first_call_at = time.time()
        state.by_custom_id[custom_id] += 1
        call = state.by_custom_id[custom_id]
        state.in_flight[model] += 1
        state.peak[model] = max(state.peak[model], state.in_flight[model])
        entry: dict[str, Any] = {
            "custom_id": custom_id,
            "model": model,
            "call": call,
            "seq": seq,
            "start": time.time(),
            "path": request.path,
        }
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            entry["port"] = peer[1]  # the client's: which calls shared a connection
        if config.log_calls and len(state.log) < config.max_log:
            entry["headers"] = {
                k.lower(): v
                for k, v in request.headers.items()
                if k.lower().startswith(LOGGED_HEADER_PREFIXES)
            }
            state.log.append(entry)
        try:
            latency = float(body.get("mock_latency_ms", config.latency_ms))
            if config.jitter_ms:
                latency += random.uniform(0, config.jitter_ms)
            if call == 1 and body.get("mock_stall_ms"):
                latency = float(body["mock_stall_ms"])
            if latency > 0:
                await asyncio.sleep(latency / 1000.0)
            resets = int(body.get("mock_reset", 0) or 0)
            if call <= resets or (config.reset_rate and random.random() < config.reset_rate):
                entry["outcome"] = "reset"
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            statuses = body.get("mock_statuses") or config.statuses
            if statuses:
                status = int(statuses[min(call, len(statuses)) - 1])
            elif config.fail_rate and random.random() < config.fail_rate:
                status = config.fail_status
            else:
                status = 200
            entry["status"] = status
            entry["outcome"] = "ok"
            headers = {"x-request-id": f"mock-{seq}"}
            if status >= 400:
                payload: dict[str, Any] = {
                    "error": {"message": f"mock error {status}", "type": "mock", "code": status}
                }
                return web.json_response(payload, status=status, headers=headers)
            text = f"reply to {custom_id} (call {call})"
            reply = mock_stream.Reply.of(request.path, body, text, seq, state.created)
            if body.get("stream") is True and not body.get("mock_stream_json"):
                entry["stream"] = True
                faulty = call <= int(body.get("mock_stream_faults", 1) or 0)
                return await mock_stream.stream(request, reply, body, faulty, entry, headers)
            payload = _response_body(request.path, model, reply)
            return web.json_response(payload, status=status, headers=headers)
        except (asyncio.CancelledError, ConnectionResetError):
            if entry.get("outcome") not in ("reset", "cut"):
                entry["outcome"] = "disconnected"
                state.disconnects += 1
            raise
        finally:
            entry["end"] = time.time()
            state.in_flight[model] -= 1

    async def stats(request: web.Request) -> web.Response:
        # ?log=0: the counters only, for pollers (the log can be megabytes)
        return web.json_response(state.stats(log=request.query.get("log") != "0"))

    async def reset(request: web.Request) -> web.Response:
        state.reset()
        return web.json_response({"ok": True})

    app.router.add_get("/_mock/stats", stats)
    app.router.add_post("/_mock/reset", reset)
    app.router.add_post("/{tail:.*}", handle)
    return app


def _bound_port(site: web.TCPSite) -> int:
    """The port actually bound (the caller may have asked for port 0)."""
    server: Any = site._server
    return int(server.sockets[0].getsockname()[1])


class MockUpstream:
    """The mock in a background thread of this process (demo and in-process tests)."""

    def __init__(self, config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.config = config or MockConfig()
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.app: web.Application | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def state(self) -> MockState:
        assert self.app is not None
        return self.app[STATE_KEY]

    def _build(self) -> web.Application:
        """The app this server runs (the mock tool server, ``testing/mock_tools.py``, runs
        its own in the same kind of thread)."""
        return build_app(self.config)

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="mock-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"mock upstream did not start: {self._error!r}")
        return self

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self.app = self._build()
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, self.host, self.port, backlog=4096)
        loop.run_until_complete(site.start())
        self.port = _bound_port(site)
        self._runner = runner
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(config: MockConfig, host: str, port: int) -> None:
    """Run in the foreground (``fusillade-celery mock-upstream``); prints the URL first."""

    async def main() -> None:
        app = build_app(config)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound = _bound_port(site)
        print(f"mock upstream listening on http://{host}:{bound}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def summarize_calls(log: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group a stats log by custom_id, calls in order (test helper)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in log:
        out[entry["custom_id"]].append(entry)
    for calls in out.values():
        calls.sort(key=lambda e: e["call"])
    return dict(out)
