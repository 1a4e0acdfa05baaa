"""API keys of the HTTP API: ``fusillade-celery keys create|list|revoke``.

A key is shown once, when it is made; the database keeps its SHA-256 (a key is 256 random
bits, so a plain hash is as good as a slow one) and its first characters, for ``list``.
A key acts for its ``--name``: the files and batches whose owner is that name, which is also
what ``submit --owner NAME`` gives a batch submitted outside the API."""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sys
import time
import uuid
from typing import Any

#: Every key starts so, which makes one easy to spot in a config file or a leak scanner.
KEY_PREFIX = "fsk-"
SHOWN_PREFIX_CHARS = 10
MAX_NAME_CHARS = 256


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def check_name(name: str) -> str:
    """An owner name: 1-256 printable characters without whitespace."""
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise ValueError(f"a key name is 1-{MAX_NAME_CHARS} printable characters")
    if any(c.isspace() for c in name):
        raise ValueError("a key name has no whitespace")
    return name


def create_key(store: Any, name: str) -> tuple[str, dict[str, Any]]:
    """A new key for ``name``: (the key, shown once; its stored row, without the hash)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = {
        "id": "key_" + uuid.uuid4().hex[:16],
        "name": check_name(name),
        "key_hash": key_hash(key),
        "prefix": key[:SHOWN_PREFIX_CHARS],
        "created_at": time.time(),
        "revoked_at": None,
    }
    store.add_key(row)
    return key, {k: v for k, v in row.items() if k != "key_hash"}


def _store() -> Any:
    from .cli import _client, _settings

    return _client(_settings()).store


def cmd_create(args: argparse.Namespace) -> int:
    from .cli import EXIT_INPUT, CliError

    try:
        name = check_name(args.name)
    except ValueError as exc:
        raise CliError(f"--name: {exc}", EXIT_INPUT) from None
    key, row = create_key(_store(), name)
    print(key)
    print(
        f"created {row['id']} for {name!r}: the key above is shown only now; its batches and "
        f"files are those with owner {name!r} (submit --owner {name})",
        file=sys.stderr,
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for row in _store().list_keys():
        if args.json:
            print(json.dumps(row, separators=(",", ":")))
            continue
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["created_at"]))
        state = "revoked" if row["revoked_at"] is not None else "live"
        print(f"{row['id']}  {row['prefix']}...  {state:<7} {row['name']}  created {created} UTC")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    changed = _store().revoke_key(args.key_id, time.time())
    print(f"revoked {args.key_id}" if changed else f"{args.key_id} was revoked already")
    return 0


def register(sub: Any) -> None:
    """The ``keys`` command group of the CLI."""
    p = sub.add_parser("keys", help="API keys of `serve` (create, list, revoke)")
    keys = p.add_subparsers(dest="keys_command", required=True)
    c = keys.add_parser("create", help="make a key; printed once, only its hash is kept")
    c.add_argument("--name", required=True, help="the owner the key acts for, e.g. team-a")
    c.set_defaults(func=cmd_create)
    c = keys.add_parser("list", help="every key: id, first characters, live or revoked, name")
    c.add_argument("--json", action="store_true", help="one JSON object per line")
    c.set_defaults(func=cmd_list)
    c = keys.add_parser("revoke", help="revoke a key by its id (key_...); at once")
    c.add_argument("key_id")
    c.set_defaults(func=cmd_revoke)
