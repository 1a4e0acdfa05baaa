"""The HTTP API's scenarios of ``python -m benchmarks.run``.

``api-upload``: a 1,000,000-line file sent with curl to ``POST /v1/files`` of a ``serve``
process on PostgreSQL (time, and the server's peak RSS from /proc), a batch made of it
(``POST /v1/batches``), and ``submit_batch`` of the same file in a fresh process into a fresh
database, for the ratio. ``api-poll``: ``GET /v1/batches/{id}`` requests per second from
``POLL_CLIENTS`` keep-alive connections for ``POLL_SECONDS``, in ``POLL_ROUNDS`` turns with the
same load on a bare FastAPI endpoint returning a fixed Batch object from one uvicorn process
(medians): the ratio is what the key check, the row read and the (0.5 s cached) counts cost."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from tests import services

PY = sys.executable
CLI = [PY, "-m", "fusillade_celery.cli"]
POLL_CLIENTS = 16
POLL_SECONDS = 12.0
POLL_ROUNDS = 3
REDIS_DB = 1

#: The reference of ``api-poll``: the same route shape, a fixed body, nothing behind it.
bare = FastAPI()
_FIXED = {
    "id": "batch_0",
    "object": "batch",
    "endpoint": "/v1/chat/completions",
    "status": "in_progress",
    "request_counts": {"total": 1000, "completed": 0, "failed": 0},
}


@bare.get("/v1/batches/{batch_id}")
def _bare_batch(batch_id: str) -> dict[str, Any]:
    return {**_FIXED, "id": batch_id}


def _rss_mb(pid: int, field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident set of a process, MB, from /proc."""
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith(field + ":"):
            return round(int(text.split()[1]) / 1024, 1)
    return 0.0


@contextmanager
def _serve(env: dict[str, str]) -> Iterator[tuple[str, int]]:
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().split()[2]
    try:
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()


@contextmanager
def _database(admin: str) -> Iterator[str]:
    from fusillade_celery.db import get_engine, normalize_url
    from fusillade_celery.migrate import upgrade

    name = services.create_database(admin)
    url = normalize_url(services.with_db(admin, name))
    engine = get_engine(url)
    upgrade(engine)
    try:
        yield url
    finally:
        engine.dispose()
        services.drop_database(admin, name)


def _env(db_url: str, redis_base: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSILLADE_")}
    env.update(
        {
            "FUSILLADE_DATABASE_URL": db_url,
            "FUSILLADE_BROKER_URL": f"{redis_base}/{REDIS_DB}",
            "FUSILLADE_UPSTREAM_URL": "http://127.0.0.1:9",
        }
    )
    return env


def _key(env: dict[str, str]) -> str:
    out = subprocess.run(
        [*CLI, "keys", "create", "--name", "bench"], env=env, capture_output=True, text=True
    )
    return out.stdout.strip()


def run_upload(lines: int) -> dict[str, Any]:
    from .run import _CHILD_PRELUDE, _child_json, write_input

    out: dict[str, Any] = {"lines": lines}
    with (
        services.postgres_server() as admin,
        services.redis_server() as redis_base,
        tempfile.TemporaryDirectory() as tmp,
    ):
        src = write_input(Path(tmp) / "in.jsonl", lines)
        out["bytes"] = src.stat().st_size
        with _database(admin) as db_url:
            env = _env(db_url, redis_base)
            key = _key(env)
            with _serve(env) as (url, pid):
                out["server_rss_mb_before"] = _rss_mb(pid, "VmRSS")
                samples: list[float] = []
                stop = threading.Event()

                def sample() -> None:
                    while not stop.wait(0.2):
                        samples.append(_rss_mb(pid, "VmRSS"))

                watcher = threading.Thread(target=sample, daemon=True)
                watcher.start()
                start = time.perf_counter()
                reply = subprocess.run(
                    ["curl", "-sS", "--fail-with-body", url + "/v1/files", "-H",
                     f"Authorization: Bearer {key}", "-F", "purpose=batch",
                     "-F", f"file=@{src}"],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                out["upload_seconds"] = round(time.perf_counter() - start, 2)
                stop.set()
                watcher.join()
                out["server_peak_rss_mb"] = _rss_mb(pid)
                out["server_rss_mb_max_sampled"] = max(samples, default=0.0)
                file_id = json.loads(reply.stdout)["id"]
                start = time.perf_counter()
                import requests

                made = requests.post(
                    url + "/v1/batches",
                    json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=600,
                )
                made.raise_for_status()
                out["create_batch_seconds"] = round(time.perf_counter() - start, 2)
        with _database(admin) as db_url:
            sub = _child_json(
                _CHILD_PRELUDE + f"c=Client(Settings().replace(database_url={db_url!r},"
                "upstream_url='http://127.0.0.1:9'),notify=False)\n"
                f"t=time.perf_counter();b=c.submit_batch({str(src)!r});s=time.perf_counter()-t\n"
                "print(json.dumps({'submit_seconds':round(s,2),'peak_rss_mb':rss()}))"
            )
        out["submit_batch_seconds"] = sub["submit_seconds"]
        out["submit_batch_peak_rss_mb"] = sub["peak_rss_mb"]
        out["upload_to_submit_batch"] = round(out["upload_seconds"] / sub["submit_seconds"], 2)
    return out


async def _load(url: str, headers: dict[str, str], seconds: float, clients: int) -> int:
    import aiohttp

    done = 0
    until = time.monotonic() + seconds

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < until:
            async with session.get(url, headers=headers) as reply:
                await reply.read()
                assert reply.status == 200, reply.status
            done += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(clients)))
    return done


def _rate(url: str, headers: dict[str, str], seconds: float) -> float:
    return asyncio.run(_load(url, headers, seconds, POLL_CLIENTS)) / seconds


def run_poll(batch_lines: int = 1000) -> dict[str, Any]:
    from .run import write_input

    with (
        services.postgres_server() as admin,
        services.redis_server() as redis_base,
        tempfile.TemporaryDirectory() as tmp,
        _database(admin) as db_url,
    ):
        env = _env(db_url, redis_base)
        key = _key(env)
        auth = {"Authorization": f"Bearer {key}"}
        src = write_input(Path(tmp) / "poll.jsonl", batch_lines)
        import requests

        port = services.free_port()
        ref = subprocess.Popen(
            [PY, "-m", "uvicorn", "benchmarks.api:bare", "--port", str(port), "--log-level",
             "warning", "--no-access-log"],
        )  # fmt: skip
        rounds: list[tuple[float, float]] = []
        try:
            with _serve(env) as (url, _):
                with src.open("rb") as fh:
                    file_id = requests.post(
                        url + "/v1/files",
                        headers=auth,
                        files={"file": fh},
                        data={"purpose": "batch"},
                        timeout=60,
                    ).json()["id"]
                batch_id = requests.post(
                    url + "/v1/batches",
                    headers=auth,
                    json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"},
                    timeout=60,
                ).json()["id"]
                services.wait_for(
                    lambda: requests.get(f"http://127.0.0.1:{port}/v1/batches/x", timeout=1).ok,
                    30,
                    what="the bare FastAPI app",
                )
                api_url = f"{url}/v1/batches/{batch_id}"
                bare_url = f"http://127.0.0.1:{port}/v1/batches/{batch_id}"
                _rate(api_url, auth, 1.0)  # warm up: connections, caches
                _rate(bare_url, auth, 1.0)
                # In turns, so the machine's drift falls on both alike.
                for _ in range(POLL_ROUNDS):
                    rounds.append(
                        (
                            _rate(api_url, auth, POLL_SECONDS / POLL_ROUNDS),
                            _rate(bare_url, auth, POLL_SECONDS / POLL_ROUNDS),
                        )
                    )
        finally:
            ref.terminate()
            ref.wait(10)
    api_rate = sorted(a for a, _ in rounds)[len(rounds) // 2]
    bare_rate = sorted(b for _, b in rounds)[len(rounds) // 2]
    return {
        "clients": POLL_CLIENTS,
        "seconds_each": POLL_SECONDS,
        "rounds_api_bare_req_per_s": [[round(a), round(b)] for a, b in rounds],
        "batch_lines": batch_lines,
        "api_req_per_s": round(api_rate, 1),
        "bare_fastapi_req_per_s": round(bare_rate, 1),
        "ratio_to_bare_fastapi": round(api_rate / bare_rate, 2),
    }
