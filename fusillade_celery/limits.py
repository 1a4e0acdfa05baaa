"""Per-model limits and SLA escalations changed while the engine runs: the Python API and the
``fusillade-celery limits`` / ``escalations`` commands.

A value set here is a row in ``model_limits`` / ``model_escalations``; it overrides the
environment's (``FUSILLADE_MODEL_LIMITS``, ``FUSILLADE_ESCALATIONS``), which stay the defaults
and come back with ``unset``. Every claimer and hand-off reads the rows through ``live.current``,
so a change is in force everywhere within one claim interval, with nothing restarted. Input is
checked whole before anything is written: a bad pair changes nothing."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from . import live
from .follow import ago
from .queues import queue_for_model
from .settings import Escalation

#: How ``escalations set`` switches an environment escalation off (``gpt-4=off``).
OFF = "off"
#: The column the store keeps model names in.
MAX_MODEL_CHARS = 256
DEFAULT_THRESHOLD_S = 900


class LimitError(ValueError):
    """A bad limit or escalation (one line, naming the pair); nothing was changed."""


def _model_name(name: str, pair: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_MODEL_CHARS or any(c.isspace() or ord(c) < 32 for c in name):
        raise LimitError(f"{pair!r}: a model name is 1-{MAX_MODEL_CHARS} printable characters")
    return name


def _limit(value: object, pair: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise LimitError(f"{pair!r}: a limit is a whole number >= 0")
    try:
        n = int(value)
    except ValueError:
        raise LimitError(f"{pair!r}: a limit is a whole number >= 0") from None
    if n < 0:
        raise LimitError(f"{pair!r}: a limit is a whole number >= 0 (0 pauses the model)")
    return n


def _split(pair: str, what: str) -> tuple[str, str]:
    name, sep, value = pair.partition("=")
    if not sep or not value.strip():
        raise LimitError(f"{pair!r}: expected {what}")
    return _model_name(name, pair), value.strip()


def parse_limits(pairs: Iterable[str]) -> dict[str, int]:
    """``["gpt-4=16", "small=4"]`` -> ``{"gpt-4": 16, "small": 4}``; raises LimitError."""
    out: dict[str, int] = {}
    for pair in pairs:
        name, value = _split(pair, "model=N (a whole number >= 0)")
        out[name] = _limit(value, pair)
    if not out:
        raise LimitError("give at least one model=N")
    return out


def parse_escalation(value: str | Escalation | None, pair: str) -> Escalation | None:
    """``"gpt-4-urgent:900"`` (threshold seconds optional, default 900), ``"off"`` or None
    (switch the model's escalation off), or an Escalation."""
    if value is None or isinstance(value, Escalation):
        if isinstance(value, Escalation):
            _model_name(value.model, pair)
            if value.threshold_s < 1:
                raise LimitError(f"{pair!r}: the threshold is a whole number of seconds >= 1")
        return value
    if value.strip().lower() == OFF:
        return None
    target, _, threshold = value.strip().partition(":")
    target = _model_name(target, pair)
    try:
        seconds = int(threshold) if threshold else DEFAULT_THRESHOLD_S
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise LimitError(f"{pair!r}: the threshold is a whole number of seconds >= 1")
    return Escalation(target, seconds)


def parse_escalations(pairs: Iterable[str]) -> dict[str, Escalation | None]:
    """``["gpt-4=gpt-4-urgent:900", "small=off"]``; raises LimitError."""
    out: dict[str, Escalation | None] = {}
    for pair in pairs:
        name, value = _split(pair, "model=escalation_model[:seconds] or model=off")
        out[name] = parse_escalation(value, pair)
    if not out:
        raise LimitError("give at least one model=escalation_model[:seconds]")
    return out


def _client(client: Any | None) -> Any:
    if client is None:
        from .submit import default_client

        return default_client()
    return client


def set_limits(limits: Mapping[str, int], client: Any | None = None) -> None:
    """Set the most requests in flight per model (0 pauses a model) for every process,
    within one claim interval. Raises LimitError for a bad value (nothing is changed)."""
    checked = {_model_name(m, f"{m}={n}"): _limit(n, f"{m}={n}") for m, n in limits.items()}
    _client(client).store.set_limits(checked, time.time())
    live.forget()


def unset_limits(models: Iterable[str], client: Any | None = None) -> int:
    """Back to the environment's limit; returns how many models had one set."""
    n: int = _client(client).store.unset_limits(list(models))
    live.forget()
    return n


def set_escalations(
    escalations: Mapping[str, str | Escalation | None], client: Any | None = None
) -> None:
    """Set (``"gpt-4-urgent:900"`` or an Escalation) or switch off (``None``/``"off"``)
    each model's SLA escalation. Raises LimitError for a bad value (nothing is changed)."""
    checked = {
        _model_name(m, f"{m}={e}"): parse_escalation(e, f"{m}={e}") for m, e in escalations.items()
    }
    for model, esc in checked.items():
        if esc is not None and esc.model == model:
            raise LimitError(f"{model}={esc.model}: a model cannot escalate to itself")
    _client(client).store.set_escalations(checked, time.time())
    live.forget()


def unset_escalations(models: Iterable[str], client: Any | None = None) -> int:
    """Back to the environment's escalation; returns how many models had one set."""
    n: int = _client(client).store.unset_escalations(list(models))
    live.forget()
    return n


def limits_table(client: Any | None = None) -> list[dict[str, Any]]:
    """Per model: its limit and where it comes from (``set``, ``env``, ``default``), the
    requests in flight, pending and retrying, and the live consumers of its queue with their
    ``-c``. Models: those with a limit set or in the environment, and those with work."""
    client = _client(client)
    store, settings = client.store, client.settings
    live.forget()
    config = live.current(store, settings)
    now = time.time()
    overview = {row.model: row for row in store.model_overview(now)}
    models = set(settings.model_limits) | set(config.stored.limits) | set(overview)
    alive_after = now - settings.stale_worker_threshold_ms / 1000.0
    workers = [
        w
        for w in store.worker_rows()
        if w["status"] == "alive" and w["last_heartbeat"] >= alive_after
    ]
    out = []
    for model in sorted(models):
        queue = queue_for_model(model)
        row = overview.get(model)
        out.append(
            {
                "model": model,
                "limit": config.limit_for(model),
                "source": config.limit_source(model),
                "in_flight": row.in_flight if row else 0,
                "pending": row.pending if row else 0,
                "retrying": row.retrying if row else 0,
                "consumers": [
                    {"worker": w["id"], "concurrency": w["concurrency"]}
                    for w in workers
                    if queue in w["queues"].split(",")
                ],
                "last_error": row.last_error_dict() if row else None,
            }
        )
    return out


def escalations_table(client: Any | None = None) -> list[dict[str, Any]]:
    """Per model with an escalation in force or switched off: target, threshold, source."""
    client = _client(client)
    live.forget()
    config = live.current(client.store, client.settings)
    out: list[dict[str, Any]] = []
    for model in sorted(set(config.escalations) | set(config.stored.escalations)):
        esc = config.escalations.get(model)
        out.append(
            {
                "model": model,
                "escalation_model": esc.model if esc else None,
                "threshold_s": esc.threshold_s if esc else None,
                "source": config.escalation_source(model),
            }
        )
    return out


# ---------------------------------------------------------------------- the commands


def _print_limits(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'MODEL':<24} {'LIMIT':>6} {'FROM':<8} {'IN FLIGHT':>9} {'PENDING':>8} "
        f"{'RETRYING':>8}  CONSUMERS (-c)"
    )
    for r in rows:
        consumers = ", ".join(f"{c['worker']} ({c['concurrency'] or '?'})" for c in r["consumers"])
        print(
            f"{r['model']:<24} {r['limit']:>6} {r['source']:<8} {r['in_flight']:>9} "
            f"{r['pending']:>8} {r['retrying']:>8}  {consumers or 'none'}"
        )
        e = r["last_error"]
        if e:
            status = f" {e['status_code']}" if e["status_code"] is not None else ""
            print(
                f"{'':<24} last error {ago(time.time() - e['at'])} ago at "
                f"{e['host'] or '(no upstream)'}: {e['kind']}{status}: {e['message']}"
            )


def _print_escalations(rows: list[dict[str, Any]]) -> None:
    print(f"{'MODEL':<24} {'ESCALATES TO':<24} {'UNDER (s)':>9} FROM")
    for r in rows:
        target = r["escalation_model"] or "off"
        threshold = r["threshold_s"] if r["threshold_s"] is not None else "-"
        print(f"{r['model']:<24} {target:<24} {threshold!s:>9} {r['source']}")


def _command(show: Any, printer: Any, set_: Any, parse: Any, unset: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        from .cli import EXIT_INPUT, EXIT_OK, CliError, _client, _settings

        client = _client(_settings())
        try:
            if args.action == "set":
                set_(parse(args.pairs), client)
            elif args.action == "unset":
                if not args.pairs:
                    raise LimitError("give at least one model")
                unset([_model_name(m, m) for m in args.pairs], client)
            elif args.pairs:
                raise LimitError(f"unexpected {' '.join(args.pairs)!r} (did you mean set?)")
        except LimitError as exc:
            raise CliError(f"{args.command}: {exc}; nothing was changed", EXIT_INPUT) from None
        rows = show(client)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            printer(rows)
        sys.stdout.flush()
        return EXIT_OK

    return run


def register(sub: Any) -> None:
    """Add ``limits`` and ``escalations`` to the CLI's subcommands."""
    for name, what, example, show, printer, set_, parse, unset in (
        (
            "limits",
            "per-model limits (in force within one claim interval; nothing restarted)",
            "limits set gpt-4=16 small=4 | limits unset gpt-4",
            limits_table,
            _print_limits,
            set_limits,
            parse_limits,
            unset_limits,
        ),
        (
            "escalations",
            "SLA escalations (in force within one claim interval; nothing restarted)",
            "escalations set gpt-4=gpt-4-urgent:900 | escalations set gpt-4=off",
            escalations_table,
            _print_escalations,
            set_escalations,
            parse_escalations,
            unset_escalations,
        ),
    ):
        p = sub.add_parser(name, help=f"show or change {what}", description=example)
        p.add_argument("action", nargs="?", choices=["show", "set", "unset"], default="show")
        p.add_argument("pairs", nargs="*", metavar="MODEL[=VALUE]")
        p.add_argument("--json", action="store_true", help="print the table as JSON")
        p.set_defaults(func=_command(show, printer, set_, parse, unset))
