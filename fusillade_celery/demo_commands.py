"""``fusillade-celery demo``, ``mock-upstream`` and ``mock-tools``: trying the engine with
nothing to set up, and the bundled mocks the demo, the tests and the benchmark run against."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out), args.requests, quiet=args.quiet, tools=args.tools)


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from .mock_upstream import MockConfig, serve

    config = MockConfig(
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        statuses=[int(s) for s in args.statuses.split(",")] if args.statuses else [],
        fail_rate=args.fail_rate,
        fail_status=args.fail_status,
        reset_rate=args.reset_rate,
        log_calls=not args.no_log,
    )
    serve(config, args.host, args.port)
    return 0


def cmd_mock_tools(args: argparse.Namespace) -> int:
    from .testing.mock_tools import serve_tools

    serve_tools(args.host, args.port)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a sample batch against the bundled mock upstream")
    p.add_argument("--requests", type=int, default=1200, help="lines in the sample batch")
    p.add_argument("--out", default="demo-out", help="directory for the input and result files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--tools",
        action="store_true",
        help="/v1/responses lines that run the tool loop (with the bundled mock tool server)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("mock-upstream", help="serve the OpenAI-compatible mock upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8089, help="0 picks a free port (printed)")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--statuses", help="status sequence per custom_id, e.g. 503,503,200")
    p.add_argument("--fail-rate", type=float, default=0.0, help="fraction answered --fail-status")
    p.add_argument("--fail-status", type=int, default=503)
    p.add_argument("--reset-rate", type=float, default=0.0, help="fraction answered by a reset")
    p.add_argument("--no-log", action="store_true", help="do not keep a call log (benchmarks)")
    p.set_defaults(func=cmd_mock_upstream)

    p = sub.add_parser("mock-tools", help="serve the mock tool server of the /v1/responses loop")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090, help="0 picks a free port (printed)")
    p.set_defaults(func=cmd_mock_tools)
