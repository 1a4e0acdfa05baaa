"""``fusillade-celery serve``: the HTTP API on uvicorn.

It refuses to start without a live API key in the database (the API would answer 401 to
everyone) unless ``--no-auth`` is given on a loopback address, where every caller sees every
batch. With no database or broker configured it runs the in-process worker beside the API
on the SQLite file: one command is a whole batch server."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
from typing import Any

log = logging.getLogger(__name__)


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _socket(host: str, port: int) -> socket.socket:
    """Listening before uvicorn starts, so ``--port 0`` can print the port it got and a
    client may connect as soon as it is printed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every reply waited for the client's delayed ACK (40 ms a request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..cli import EXIT_INPUT, CliError, _settings
    from ..embedded import Background
    from .app import create_app

    if args.no_auth and not loopback(args.host):
        raise CliError(
            f"--no-auth serves every batch to anyone who can connect: only on a loopback "
            f"address (127.0.0.1, ::1, localhost), not {args.host}",
            EXIT_INPUT,
        )
    from ..app import configure
    from ..submit import Client

    settings = _settings()
    configure(settings)
    client = Client(settings, pre_ping=False)
    if not args.no_auth and client.store.live_key_count() == 0:
        raise CliError(
            "no API key in the database: create one with `fusillade-celery keys create "
            "--name NAME`, or serve without keys with --no-auth on 127.0.0.1",
            EXIT_INPUT,
        )
    background = Background(client, args.concurrency) if settings.embedded else None
    app = create_app(client, auth=not args.no_auth, background=background)
    try:
        sock = _socket(args.host, args.port)
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    mode = "embedded worker on the SQLite file" if background else "stateless (PostgreSQL + broker)"
    print(f"serving on http://{where}:{port} ({mode})", flush=True)
    config = uvicorn.Config(
        app,
        log_level="info" if args.verbose else "warning",
        access_log=args.verbose,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def register(sub: Any) -> None:
    """The ``serve`` command of the CLI."""
    from ..embedded import SERVER_CONCURRENCY

    p = sub.add_parser("serve", help="the OpenAI-compatible HTTP API (Files, Batches) and a page")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks one)")
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="no API keys: every caller sees every batch (only on a loopback --host)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=SERVER_CONCURRENCY,
        help="embedded mode: worker threads beside the API (default "
        f"{SERVER_CONCURRENCY}; model limits bound what runs)",
    )
    p.set_defaults(func=cmd_serve)
