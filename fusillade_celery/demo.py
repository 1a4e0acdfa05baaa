"""``fusillade-celery demo``: a real batch, end to end, with nothing to set up.

Starts the bundled mock upstream on 127.0.0.1, writes a sample JSONL of two models (a few lines
asking the mock for transient and permanent failures, to show retries and the error file), and
processes it on the embedded default with a progress bar. ``--tools``: ``/v1/responses`` lines
whose model asks for server-side tools (the bundled mock tool server: an http tool, and an agent
of its own model), so each line runs a real three-step loop.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .embedded import run_batch
from .mock_upstream import MockConfig, MockUpstream
from .settings import Settings
from .toolconfig import ToolConfig, parse_tools

MODELS = ("demo-small", "demo-large")


def sample_lines(n: int) -> list[dict[str, Any]]:
    lines = []
    for i in range(n):
        body: dict[str, object] = {
            "model": MODELS[i % 2],
            "messages": [{"role": "user", "content": f"Say something about the number {i}."}],
            "max_tokens": 32,
        }
        if i % 50 == 7:
            body["mock_statuses"] = [503, 200]  # transient: retried, then completes
        if i % 200 == 13:
            body["mock_statuses"] = [400]  # permanent: lands in the error file
        lines.append(
            {
                "custom_id": f"demo-{i:05d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
        )
    return lines


def tool_lines(n: int) -> list[dict[str, Any]]:
    """``/v1/responses`` lines for ``demo --tools``: the model asks for the weather (an http
    tool), then for the summarizer (an agent), then answers: three model calls, one nested."""
    script = [
        [{"name": "get_weather", "arguments": {"city": "Paris"}}],
        [{"name": "summarizer", "arguments": {"input": "Summarize the weather in Paris."}}],
    ]
    return [
        {
            "custom_id": f"tools-{i:05d}",
            "method": "POST",
            "url": "/v1/responses",
            "body": {
                "model": MODELS[i % 2],
                "instructions": "Use the tools, then answer in one sentence.",
                "input": f"What should I wear in Paris today? ({i})",
                "mock_tool_script": script,
            },
        }
        for i in range(n)
    ]


def demo_tools(tools_url: str) -> ToolConfig:
    """The demo's ``FUSILLADE_TOOLS``: the mock tool server's weather tool and an agent."""
    return parse_tools(
        json.dumps(
            [
                {
                    "name": "get_weather",
                    "kind": "http",
                    "url": f"{tools_url}/tools/get_weather",
                    "description": "The weather in a city today",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                    "idempotent": True,
                },
                {
                    "name": "summarizer",
                    "kind": "agent",
                    "model": "demo-small",
                    "instructions": "Summarize what you are given in one line.",
                    "description": "Summarizes a text",
                },
            ]
        )
    )


def run_demo(out_dir: Path, n: int, quiet: bool = False, tools: bool = False) -> int:
    from .app import configure
    from .follow import ProgressBar, write_jsonl
    from .submit import Client
    from .testing.mock_tools import MockTools

    out_dir.mkdir(parents=True, exist_ok=True)
    input_path = out_dir / "requests.jsonl"
    if tools:
        n = min(n, 200)  # each line is three model calls and two tool calls
    write_jsonl(input_path, iter(tool_lines(n) if tools else sample_lines(n)))
    db_path = out_dir / "demo.sqlite3"
    for stale in out_dir.glob("demo.sqlite3*"):
        stale.unlink()
    with (
        MockUpstream(MockConfig(latency_ms=20, jitter_ms=30, log_calls=False)) as mock,
        MockTools() as tool_server,
    ):
        settings = Settings.from_env().replace(
            database_url=f"sqlite:///{db_path}",
            broker_url="",
            upstream_url=mock.url,
            upstream_api_key="demo-key",
            routes={},
            model_limits={"demo-small": 24, "demo-large": 12},
            backoff_ms=200,
            tools=demo_tools(tool_server.url) if tools else ToolConfig(),
        )
        configure(settings)
        client = Client(settings)
        print(
            f"mock upstream on {mock.url}; {n} requests over {', '.join(MODELS)}", file=sys.stderr
        )
        started = time.time()
        batch_id = client.submit_batch(input_path, metadata={"source": "demo"})
        bar = ProgressBar(batch_id, enabled=not quiet)
        batch = run_batch(client, batch_id, on_progress=bar)
        bar.close()
        elapsed = time.time() - started
        out, err = out_dir / "output.jsonl", out_dir / "errors.jsonl"
        n_out = write_jsonl(out, client.iter_results(batch_id))
        n_err = write_jsonl(err, client.iter_results(batch_id, errors=True))
        calls = mock.state.calls
        tool_calls = tool_server.tools.calls
    counts = batch["request_counts"]
    print(
        json.dumps(
            {
                "batch": batch_id,
                "status": batch["status"],
                "request_counts": counts,
                "upstream_calls": calls,
                **({"tool_calls": tool_calls} if tools else {}),
                "seconds": round(elapsed, 2),
                "requests_per_second": round(counts["total"] / elapsed, 1),
                "output_file": str(out),
                "error_file": str(err),
                "output_lines": n_out,
                "error_lines": n_err,
            },
            indent=2,
        )
    )
    return 0 if batch["status"] == "completed" else 1
