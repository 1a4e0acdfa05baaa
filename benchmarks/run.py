"""The benchmark: ``python -m benchmarks.run`` (or ``make bench``) prints one JSON object.

It starts what it needs (the mock upstream; a PostgreSQL database, Redis, beat and workers as
real processes for the distributed scenarios), runs each scenario with a bounded request count,
and for the upstream scenarios also times a bare ``requests.Session`` loop against the same
upstream in the same run, reporting the ratio.

Scenarios: ``instant`` (no upstream latency, distributed), ``latency`` (1 s upstream latency,
distributed, a high model limit), ``embedded`` (``fusillade-celery run`` on SQLite), ``submit``
(validation + insert of a large file, and streaming the results back).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import requests

from tests import services

PY = sys.executable


def _line(i: int, model: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"hello {i}"}],
        "max_tokens": 8,
    }
    return json.dumps(
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    )


def write_input(path: Path, n: int, model: str = "bench") -> Path:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(_line(i, model) + "\n")
    return path


@contextmanager
def mock_upstream(latency_ms: float = 0) -> Iterator[str]:
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "fusillade_celery.cli",
            "mock-upstream",
            "--port",
            "0",
            "--no-log",
            "--latency-ms",
            str(latency_ms),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip().rsplit(" ", 1)[1]
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def bare_loop(url: str, n: int) -> float:
    """Requests per second of one requests.Session posting sequentially: the reference."""
    session = requests.Session()
    body = _line(0, "bench").encode()
    start = time.perf_counter()
    for _ in range(n):
        session.post(url + "/v1/chat/completions", data=body, timeout=30).raise_for_status()
    return n / (time.perf_counter() - start)


@contextmanager
def cluster(env_extra: dict[str, str], workers: int, concurrency: int) -> Iterator[dict[str, str]]:
    """PostgreSQL database + Redis db + beat + workers on model.bench, as real processes."""
    from fusillade_celery.db import get_engine, normalize_url
    from fusillade_celery.migrate import upgrade

    with services.postgres_server() as admin, services.redis_server() as redis_url:
        name = services.create_database(admin)
        db_url = normalize_url(services.with_db(admin, name))
        upgrade(get_engine(db_url))
        broker = f"{redis_url}/12"
        redis.Redis.from_url(broker).flushdb()
        env = {
            **os.environ,
            "FUSILLADE_DATABASE_URL": db_url,
            "FUSILLADE_BROKER_URL": broker,
            **env_extra,
        }
        logdir = Path(tempfile.mkdtemp(prefix="fusillade-bench-"))
        procs = []

        def celery(args: list[str], log: str) -> None:
            with (logdir / log).open("wb") as fh:
                procs.append(
                    subprocess.Popen(
                        [PY, "-m", "celery", "-A", "fusillade_celery", *args],
                        env=env,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

        celery(["beat", "-l", "warning", "--schedule", str(logdir / "beat-schedule")], "beat.log")
        for i in range(workers):
            celery(
                [
                    "worker",
                    "-Q",
                    "model.bench",
                    "-P",
                    "gevent",
                    "-c",
                    str(concurrency),
                    "-n",
                    f"bench{i}@%h",
                    "-l",
                    "info",
                ],
                f"w{i}.log",
            )
        try:
            for i in range(workers):
                services.wait_for(
                    lambda i=i: "ready." in (logdir / f"w{i}.log").read_text(),
                    60,
                    what="benchmark worker",
                )
            yield env
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                p.wait(30)
            services.drop_database(admin, name)


def run_distributed(
    n: int,
    latency_ms: float,
    limit: int,
    workers: int,
    concurrency: int,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    from fusillade_celery.app import configure
    from fusillade_celery.settings import Settings
    from fusillade_celery.submit import Client

    with mock_upstream(latency_ms) as url, tempfile.TemporaryDirectory() as tmp:
        src = write_input(Path(tmp) / "in.jsonl", n)
        env_extra = {
            "FUSILLADE_UPSTREAM_URL": url,
            "FUSILLADE_MODEL_LIMITS": f"bench={limit}",
            "FUSILLADE_CLAIM_BATCH_SIZE": str(max(limit, 100)),
            **(extra or {}),
        }
        bare_n = min(n, 2000) if latency_ms == 0 else 5
        bare = bare_loop(url, bare_n)
        with cluster(env_extra, workers, concurrency) as env:
            settings = Settings.from_env(env)
            configure(settings)
            client = Client(settings)
            start = time.perf_counter()
            batch_id = client.submit_batch(src)
            submitted = time.perf_counter()
            while client.get_batch(batch_id)["status"] != "completed":
                time.sleep(0.05)
            elapsed = time.perf_counter() - start
            counts = client.get_batch(batch_id)["request_counts"]
        rate = n / elapsed
        out = {
            "requests": n,
            "seconds": round(elapsed, 2),
            "submit_seconds": round(submitted - start, 2),
            "req_per_s": round(rate, 1),
            "bare_loop_req_per_s": round(bare, 1),
            "ratio_to_bare_loop": round(rate / bare, 2),
            "completed": counts["completed"],
            "workers": workers,
            "concurrency": concurrency,
            "limit": limit,
            "upstream": "mock-upstream (aiohttp)",
        }
        if latency_ms:
            ideal = limit / (latency_ms / 1000.0)
            out["ideal_req_per_s"] = ideal
            out["fraction_of_ideal"] = round(rate / ideal, 2)
        return out


def run_embedded(n: int) -> dict[str, Any]:
    with mock_upstream(0) as url, tempfile.TemporaryDirectory() as tmp:
        src = write_input(Path(tmp) / "in.jsonl", n)
        env = {
            **os.environ,
            "FUSILLADE_DATABASE_URL": f"sqlite:///{tmp}/state.sqlite3",
            "FUSILLADE_UPSTREAM_URL": url,
            "FUSILLADE_MODEL_LIMITS": "bench=32",
        }
        env.pop("FUSILLADE_BROKER_URL", None)
        bare = bare_loop(url, min(n, 2000))
        start = time.perf_counter()
        subprocess.run(
            [PY, "-m", "fusillade_celery.cli", "run", "-q", str(src)],
            env=env,
            check=True,
            capture_output=True,
        )
        elapsed = time.perf_counter() - start
    return {
        "requests": n,
        "seconds": round(elapsed, 2),
        "req_per_s": round(n / elapsed, 1),
        "bare_loop_req_per_s": round(bare, 1),
        "ratio_to_bare_loop": round(n / elapsed / bare, 2),
    }


def run_submit(n: int) -> dict[str, Any]:
    """Submit n lines to PostgreSQL in a child process (its peak RSS is the figure), then
    stream the (pending-state) input back to time the reader."""
    from fusillade_celery.db import get_engine, normalize_url
    from fusillade_celery.migrate import upgrade

    with services.postgres_server() as admin, tempfile.TemporaryDirectory() as tmp:
        name = services.create_database(admin)
        db_url = normalize_url(services.with_db(admin, name))
        upgrade(get_engine(db_url))
        src = write_input(Path(tmp) / "big.jsonl", n)
        code = (
            "import time,resource,json,sys;from fusillade_celery.settings import Settings;"
            "from fusillade_celery.submit import Client;"
            f"c=Client(Settings().replace(database_url={db_url!r},upstream_url='http://127.0.0.1:9'));"
            f"t=time.perf_counter();b=c.submit_batch({str(src)!r});s=time.perf_counter()-t;"
            "t=time.perf_counter();k=sum(1 for _ in c.iter_file(c.get_batch(b)['input_file_id']));"
            "r=time.perf_counter()-t;"
            "print(json.dumps({'submit_seconds':round(s,2),'read_lines_per_s':round(k/r),"
            "'peak_rss_mb':round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)}))"
        )
        res = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
        services.drop_database(admin, name)
    return {
        "lines": n,
        "bytes": src.stat().st_size if src.exists() else None,
        **json.loads(res.stdout),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default="instant,latency,embedded,submit")
    p.add_argument("--instant-requests", type=int, default=5000)
    p.add_argument("--latency-requests", type=int, default=3000)
    p.add_argument("--latency-limit", type=int, default=500)
    p.add_argument("--embedded-requests", type=int, default=2000)
    p.add_argument("--submit-lines", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=100)
    args = p.parse_args(argv)
    wanted = args.scenarios.split(",")
    result: dict[str, Any] = {
        "machine": {"cores": os.cpu_count()},
        "nginx": "not used (mock-upstream)",
    }
    if "instant" in wanted:
        result["instant"] = run_distributed(
            args.instant_requests, 0, 10_000, args.workers, args.concurrency
        )
    if "latency" in wanted:
        result["latency"] = run_distributed(
            args.latency_requests,
            1000,
            args.latency_limit,
            args.workers,
            max(args.concurrency, args.latency_limit // args.workers + 10),
        )
    if "embedded" in wanted:
        result["embedded"] = run_embedded(args.embedded_requests)
    if "submit" in wanted:
        result["submit"] = run_submit(args.submit_lines)
    result["bench_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
