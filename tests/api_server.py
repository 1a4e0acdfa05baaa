"""``fusillade-celery serve`` as a real uvicorn process for the API tests, and what they share:
keys made with the CLI, an OpenAI SDK client, JSONL bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openai import OpenAI

CLI = [sys.executable, "-m", "fusillade_celery.cli"]
TERMINAL = {"completed", "failed", "expired", "cancelled"}


@dataclass
class Server:
    url: str
    env: dict[str, str]
    proc: subprocess.Popen[str]
    log: Path
    clients: list[OpenAI] = field(default_factory=list)

    def sdk(self, key: str, retries: int = 0) -> OpenAI:
        """The official SDK pointed at this server (closed when the server stops)."""
        client = OpenAI(api_key=key, base_url=self.url + "/v1", max_retries=retries)
        self.clients.append(client)
        return client

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def make_key(env: dict[str, str], name: str) -> str:
    """``fusillade-celery keys create --name NAME``: the key is the one line on stdout."""
    res = subprocess.run(
        [*CLI, "keys", "create", "--name", name], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    (key,) = res.stdout.split()
    return key


@contextmanager
def serving(env: dict[str, str], log: Path, *extra: str) -> Iterator[Server]:
    """Start ``serve --port 0`` with ``env`` and yield it once it printed its URL (it binds
    before printing, so it accepts connections from then on); stopped with SIGTERM."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            [*CLI, "serve", "--port", "0", *extra],
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if not first.startswith("serving on "):
        proc.wait(10)
        raise AssertionError(f"serve did not start: {first!r} {log.read_text()}")
    server = Server(first.split()[2], env, proc, log)
    try:
        yield server
    finally:
        for client in server.clients:
            client.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        proc.stdout.close()


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def server_env(db_url: str, upstream: str, **settings: str) -> dict[str, str]:
    """The environment of a server and of the CLI commands beside it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSILLADE_")}
    env.update(
        {
            "FUSILLADE_DATABASE_URL": db_url,
            "FUSILLADE_UPSTREAM_URL": upstream,
            "FUSILLADE_UPSTREAM_API_KEY": "sk-upstream-SECRET-77",
            "FUSILLADE_BACKOFF_MS": "50",
            "FUSILLADE_MAX_BACKOFF_MS": "200",
            "FUSILLADE_CANCELLATION_POLL_INTERVAL_MS": "200",
        }
    )
    env.update({"FUSILLADE_" + k.upper(): v for k, v in settings.items()})
    return env
