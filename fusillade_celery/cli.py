"""``fusillade-celery``: migrate, run, submit, status, list, results, cancel, delete, demo,
mock-upstream, mock-tools, settings; the operator groups (limits, escalations, exporter,
top, keys) and ``serve`` register themselves from their own modules.

Every failure a user can cause (bad input, bad configuration, unknown batch, unreachable
database) ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .follow import (
    ProgressBar,
    file_sha256,
    follow,
    warn_unserved,
    with_models,
    write_results,
)
from .settings import ConfigError, Settings, env_table, redact_url, unknown_env_names

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INPUT = 2
#: ``run`` followed its batch to the end, and the batch ended failed, expired or cancelled.
EXIT_BATCH_NOT_COMPLETED = 3
EXIT_INTERRUPTED = 130


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------- helpers


def _settings() -> Settings:
    settings = Settings.from_env()
    for name in unknown_env_names():
        print(f"fusillade-celery: warning: unknown setting {name} is ignored", file=sys.stderr)
    return settings


def _api_key(args: argparse.Namespace, settings: Settings) -> str | None:
    """The batch's upstream key: ``--api-key KEY``, ``--api-key -`` (the first line of
    standard input, so the key is not in ``ps``), else ``FUSILLADE_BATCH_API_KEY``."""
    if args.api_key == "-":
        key = sys.stdin.readline().strip()
        if not key:
            raise CliError("--api-key -: standard input has no key on its first line", EXIT_INPUT)
        return key
    return args.api_key or settings.batch_api_key or None


def _owner(args: argparse.Namespace) -> str | None:
    from .keys import check_name

    if args.owner is None:
        return None
    try:
        return check_name(args.owner)
    except ValueError as exc:
        raise CliError(f"--owner: {exc}", EXIT_INPUT) from None


def _window(args: argparse.Namespace, settings: Settings) -> str:
    return str(args.completion_window or settings.completion_window)


def _client(settings: Settings) -> Any:
    from .app import configure
    from .submit import Client

    configure(settings)
    return Client(settings)


def _default_paths(input_path: Path, output: str | None, errors: str | None) -> tuple[Path, Path]:
    stem = input_path.name.removesuffix(".jsonl")
    out = Path(output) if output else input_path.with_name(f"{stem}.output.jsonl")
    err = Path(errors) if errors else input_path.with_name(f"{stem}.errors.jsonl")
    for path in (out, err):
        # Checked before the run, not after it: a typo must not cost a batch's results.
        if not path.parent.is_dir():
            raise CliError(f"no such directory for {path}: {path.parent}", EXIT_INPUT)
    return out, err


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise CliError(f"--metadata expects key=value, got {bad[0]!r}", EXIT_INPUT)
    return dict(kv.split("=", 1) for kv in pairs)


# ---------------------------------------------------------------------- commands


def cmd_migrate(args: argparse.Namespace) -> int:
    from .db import get_engine
    from .migrate import current_revision, upgrade

    settings = _settings()
    engine = get_engine(settings.database_url)
    upgrade(engine)
    print(f"migrated {redact_url(settings.database_url)} to {current_revision(engine)}")
    return EXIT_OK


def _run_embedded(
    client: Any, batch_id: str, bar: Callable[[dict[str, Any]], None], concurrency: int | None
) -> dict[str, Any]:
    """``run_batch`` with Ctrl-C turned into a flag its loop checks every tick (it then raises
    KeyboardInterrupt itself). Raised from the signal handler, the KeyboardInterrupt could land
    in a finalizer (a pooled connection's, a thread's), where Python prints and drops it, and
    the run carried on to the end."""
    from .embedded import run_batch

    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        return run_batch(
            client, batch_id, on_progress=bar, concurrency=concurrency, stop=interrupted
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_run(args: argparse.Namespace) -> int:
    """Submit INPUT and process it to the end; embedded unless a broker is configured.

    The same command again finds the batch made from the same content (and upstream), in
    both modes: embedded, it resumes it here; with a broker, the batch has carried on in the
    cluster, and submitting the file again would send every request a second time, so the
    command follows it instead (``--fresh`` submits again)."""
    from .submit import batch_upstream

    settings = _settings()
    input_path = Path(args.input)
    if not input_path.is_file():
        raise CliError(f"no such file: {input_path}", EXIT_INPUT)
    if settings.embedded:  # this process runs the requests: a bad processor, before submit
        from . import processors

        processors.load(settings)
    out, err = _default_paths(input_path, args.output, args.errors)
    api_key = _api_key(args, settings)
    client = _client(settings)
    batch_id = None
    if not args.fresh:
        batch_id = client.store.find_resumable_batch(
            file_sha256(input_path), batch_upstream(args.upstream)
        )
        if batch_id:
            verb = "resuming" if settings.embedded else "following"
            print(f"{verb} {batch_id} (same input; --fresh submits it again)", file=sys.stderr)
    if batch_id is None:
        batch_id = client.submit_batch(
            input_path,
            completion_window=_window(args, settings),
            upstream=args.upstream,
            api_key=api_key,
            owner=_owner(args),
        )
        print(f"submitted {batch_id}", file=sys.stderr)
    bar = ProgressBar(batch_id, enabled=not args.quiet, client=client)
    try:
        if settings.embedded:
            batch = _run_embedded(client, batch_id, bar, args.concurrency)
        else:
            batch = follow(client, batch_id, bar)
    except KeyboardInterrupt:
        bar.close()
        if settings.embedded:
            print(f"interrupted; run the same command again to resume {batch_id}", file=sys.stderr)
        else:
            print(
                f"interrupted; {batch_id} carries on in the cluster: follow it with "
                f"`fusillade-celery status {batch_id} --watch` (or this command again, which "
                f"writes the results), stop it with `fusillade-celery cancel {batch_id}`",
                file=sys.stderr,
            )
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)  # worker threads may sit in an upstream call: do not wait
    bar.close()
    n_out, n_err = write_results(client, batch_id, out, err)
    counts = batch["request_counts"]
    print(
        f"{batch_id} {batch['status']}: {counts['completed']} completed, {counts['failed']} failed"
        f" -> {out} ({n_out} lines), {err} ({n_err} lines)"
    )
    if batch["status"] != "completed":
        why = {
            "failed": "every request failed",
            "expired": "its completion window ended first",
            "cancelled": "it was cancelled",
        }.get(batch["status"], batch["status"])
        return _fail(
            f"batch {batch_id} ended {batch['status']} ({why}); see {err}",
            EXIT_BATCH_NOT_COMPLETED,
        )
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    settings = _settings()
    metadata = _metadata(args.metadata)
    api_key = _api_key(args, settings)
    client = _client(settings)
    batch_id = client.submit_batch(
        Path(args.input),
        completion_window=_window(args, settings),
        upstream=args.upstream,
        api_key=api_key,
        metadata=metadata,
        owner=_owner(args),
    )
    print(batch_id)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(_settings())
    if args.watch:
        bar = ProgressBar(args.batch_id, client=client)
        batch = follow(client, args.batch_id, bar)
        bar.close()
    else:
        batch = client.get_batch(args.batch_id)
        warn_unserved(client, args.batch_id)
    print(json.dumps(with_models(client, batch), indent=2))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """The newest batches, one line each (``--json``: Batch objects, one per line)."""
    client = _client(_settings())
    for batch in client.list_batches(args.limit):
        if args.json:
            print(json.dumps(batch, separators=(",", ":")))
            continue
        counts = batch["request_counts"]
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(batch["created_at"]))
        print(
            f"{batch['id']}  {batch['status']:<11} {counts['completed']}/{counts['total']} "
            f"completed, {counts['failed']} failed  created {created} UTC"
        )
    return EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    client = _client(_settings())
    out = sys.stdout
    for line in client.iter_results(args.batch_id, errors=args.errors):
        out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
        out.write("\n")
    out.flush()
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    client = _client(_settings())
    print(json.dumps(client.cancel_batch(args.batch_id), indent=2))
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    client = _client(_settings())
    if args.id.startswith("file-"):
        client.delete_file(args.id)
    else:
        client.delete_batch(args.id)
    print(f"deleted {args.id} (its rows are purged in the background)")
    return EXIT_OK


def cmd_settings(args: argparse.Namespace) -> int:
    """Every setting with the value this environment gives it (secrets masked) and whether
    that is from the environment or the default; unknown ``FUSILLADE_*`` names are warned
    about (by ``_settings``)."""
    settings = _settings()
    for name, value, source, doc in env_table(settings):
        print(f"{name:<42} {value[:40]:<40} {source:<7} {doc}")
    sys.stdout.flush()
    return EXIT_OK


# ---------------------------------------------------------------------- parser


def _upstream_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--upstream",
        help="base URL of the upstream for this batch (default: routes / FUSILLADE_UPSTREAM_URL)",
    )
    p.add_argument(
        "--api-key",
        help="API key for --upstream; '-' reads it from the first line of standard input "
        "(default: env FUSILLADE_BATCH_API_KEY); never printed. Prefer '-' or the env var: "
        "a key given here is visible in ps",
    )
    p.add_argument(
        "--completion-window",
        help="deadline of the batch, e.g. 24h, 30m (default: env FUSILLADE_COMPLETION_WINDOW "
        "or 24h)",
    )
    p.add_argument(
        "--owner",
        help="the API key name whose callers see the batch through `serve` (default: none; "
        "`fusillade-celery keys create --name NAME` makes a key for NAME)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusillade-celery",
        description="Self-hosted OpenAI Batch API engine on Celery. "
        "Settings come from FUSILLADE_* env vars: see `fusillade-celery settings`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="create or upgrade the schema (FUSILLADE_DATABASE_URL)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("run", help="process INPUT.jsonl to the end and write output/error files")
    p.add_argument("input")
    p.add_argument("--output", help="output file (default INPUT.output.jsonl)")
    p.add_argument("--errors", help="error file (default INPUT.errors.jsonl)")
    _upstream_flags(p)
    p.add_argument("--fresh", action="store_true", help="do not resume an earlier run of INPUT")
    p.add_argument(
        "--concurrency",
        type=int,
        help="embedded worker threads (default: the sum of the batch's model limits, at most 1024)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="validate and enqueue INPUT.jsonl; prints the batch id")
    p.add_argument("input")
    _upstream_flags(p)
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="batch metadata")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="the Batch object as JSON, with its models' last errors")
    p.add_argument("batch_id")
    p.add_argument("--watch", action="store_true", help="show progress until the batch ends")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("list", help="the newest batches, one line each")
    p.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    p.add_argument("--json", action="store_true", help="Batch objects as JSON lines")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("results", help="output lines (or --errors lines) as JSONL on stdout")
    p.add_argument("batch_id")
    p.add_argument("--errors", action="store_true")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("cancel", help="cancel a batch")
    p.add_argument("batch_id")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("delete", help="soft-delete a batch or a file; purge erases its rows")
    p.add_argument("id", help="batch_... or file-...")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser(
        "settings", help="every FUSILLADE_* env var with the value in effect (secrets masked)"
    )
    p.set_defaults(func=cmd_settings)

    # each group of commands registers its own
    from . import demo_commands, exporter, keys, limits, top
    from .api import serve

    demo_commands.register(sub)
    limits.register(sub)
    exporter.register(sub)
    top.register(sub)
    keys.register(sub)
    serve.register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusillade-celery")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

    from .db import SchemaError
    from .store import NotFound
    from .validation import InputError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
        return code
    except BrokenPipeError:
        # ``results ... | head``, ``settings | head``: the reader has what it wanted. Point
        # stdout at /dev/null so the interpreter's own flush at exit prints no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except InputError as exc:
        return _fail(f"invalid input: {exc}", EXIT_INPUT)
    except (ConfigError, SchemaError) as exc:
        return _fail(f"configuration: {exc}", EXIT_INPUT)
    except ArgumentError as exc:  # a URL SQLAlchemy could not use (FUSILLADE_DATABASE_URL)
        return _fail(f"configuration: FUSILLADE_DATABASE_URL: {exc}", EXIT_INPUT)
    except NotFound as exc:
        return _fail(str(exc), EXIT_INPUT)
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except OperationalError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        return _fail(f"database unreachable: {first}", EXIT_ERROR)
    except DBAPIError as exc:  # the statement refused: one line (engines hide parameters)
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        return _fail(f"database error: {first}", EXIT_ERROR)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _fail(message: str, code: int) -> int:
    print(f"fusillade-celery: error: {message}", file=sys.stderr)
    return code


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    # ``python -m``: run the package's module, not this ``__main__`` copy of it, so that the
    # CliError raised by commands registered from other modules is the one main catches.
    from fusillade_celery.cli import entrypoint as _entrypoint

    _entrypoint()
