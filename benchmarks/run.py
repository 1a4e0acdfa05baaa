"""The benchmark: ``python -m benchmarks.run`` (or ``make bench``) prints one JSON object.

It starts what it needs (the upstream: nginx returning a fixed completion when nginx is
installed, else the bundled aiohttp mock; a PostgreSQL database, Redis, beat and workers as
real processes for the distributed scenarios), runs each scenario with a bounded request count,
and for the upstream scenarios also times a bare ``requests.Session`` loop against the same
upstream in the same run, reporting the ratio.

Scenarios (issue 4's targets): ``instant`` (20,000 requests, instant upstream, distributed),
``instant-queue`` (the same without slot hand-off: every request through claim and broker),
``latency`` (10,000 requests, 1 s upstream latency on the aiohttp mock, model limit 1,000; also
the time from ``submit_batch`` returning to the first upstream call), ``latency-nginx`` (the
same on nginx's ``echo_sleep``, when nginx has its echo module), ``instant-stream`` and
``latency-stream`` (``instant`` and ``latency`` with every call streamed and reassembled:
nginx sends a fixed event stream, in chunks with its echo module; the mock streams its
replies), ``embedded``
(``fusillade-celery run`` on SQLite), ``scale`` (submit 1,000,000 lines: time and peak RSS; the
claim statement at 10,000 and 1,000,000 pending rows, timed in turns, with its plan;
``iter_results`` lines/s and RSS; the purge of a 10,000-line batch beside them), ``memory``
(worker RSS after 10,000 and after 100,000 requests), ``api-upload`` and ``api-poll`` (the
HTTP API: ``benchmarks/api.py``). ``--scenarios a,b`` picks some; an
unknown name is an error. The distributed
scenarios also report CPU per request (the whole machine's, and the workers'), steadier across
runs than rates on a machine whose speed drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
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


NGINX_REPLY = json.dumps(
    {
        "id": "chatcmpl-nginx",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "fixed reply"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
)


#: NGINX_REPLY as a chat completion stream: role, two pieces of content, the finish, the
#: usage (the worker asks for it) and [DONE]; reassembled, it is NGINX_REPLY.
_CHUNK_HEAD = '"id":"chatcmpl-nginx","object":"chat.completion.chunk","created":0,"model":"bench"'
NGINX_SSE_EVENTS = [
    "{" + _CHUNK_HEAD + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    '"finish_reason":null}]}',
    "{" + _CHUNK_HEAD + ',"choices":[{"index":0,"delta":{"content":"fixed"},'
    '"finish_reason":null}]}',
    "{" + _CHUNK_HEAD + ',"choices":[{"index":0,"delta":{"content":" reply"},'
    '"finish_reason":null}]}',
    "{" + _CHUNK_HEAD + ',"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
    "{" + _CHUNK_HEAD + ',"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,'
    '"total_tokens":12}}',
    "[DONE]",
]


def _nginx_sse_answer() -> str:
    """nginx directives answering with NGINX_SSE_EVENTS: one chunk per event (flushed), as
    inference servers stream, when nginx has its echo module; else one fixed body."""
    events = [f"data: {e}\\n\\n".replace("'", "\\'") for e in NGINX_SSE_EVENTS]
    if not ECHO_MODULE.exists():
        return f"return 200 '{''.join(events)}';"
    return "echo_read_request_body; " + " echo_flush; ".join(f"echo -n '{e}';" for e in events)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Debian's nginx module with ``echo_sleep``: a fixed-latency upstream in C.
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


@contextmanager
def nginx_upstream(
    latency_s: float = 0.0, call_log: Path | None = None, sse: bool = False
) -> Iterator[str]:
    """nginx returning a fixed completion (the issue's reference upstream): one C worker,
    so the upstream takes little of the two cores the pipeline is measured on. With
    ``latency_s``, each reply waits that long first (``echo_sleep``, needs ``ECHO_MODULE``):
    the aiohttp mock spends about a fifth of a core at 1,000 replies a second, CPU that a
    real upstream, on its own machines, does not take from the workers. With ``call_log``,
    nginx writes one line per call there (end time, duration, connection; complete once
    the context has exited) for ``call_timeline``. With ``sse``, the reply is the same
    completion as an event stream (``NGINX_SSE_EVENTS``)."""
    binary = nginx_binary()
    assert binary is not None, "nginx is not installed"
    assert not latency_s or ECHO_MODULE.exists(), "nginx's echo module is not installed"
    prefix = Path(tempfile.mkdtemp(prefix="fusillade-nginx-"))
    prefix.chmod(0o755)
    port = _free_port()
    user = "user root root;" if os.geteuid() == 0 else ""
    reply = NGINX_REPLY.replace("'", "\\'")
    module, answer, content_type = "", f"return 200 '{reply}';", "application/json"
    if sse:
        assert not latency_s, "a streamed reply after a latency is the mock's (latency-stream)"
        module = f"load_module {ECHO_MODULE};" if ECHO_MODULE.exists() else ""
        answer, content_type = _nginx_sse_answer(), "text/event-stream"
    elif latency_s:
        module = f"load_module {ECHO_MODULE};"
        # The reply after the sleep comes from ``return`` (an internal redirect), as the
        # instant upstream's does: with a Content-Length, as OpenAI-compatible servers send
        # a completion, where ``echo`` would stream it chunked.
        answer = f"echo_read_request_body; echo_sleep {latency_s}; echo_exec /_reply;"
    access_log = "access_log off;"
    if call_log is not None:
        access_log = (
            'log_format calls "$msec $request_time $connection"; '
            f"access_log {call_log} calls buffer=256k flush=1s;"
        )
    (prefix / "nginx.conf").write_text(
        f"""{user}
{module}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  {access_log}
  client_body_temp_path {prefix}/body;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      default_type {content_type};
      {answer}
    }}
    location = /_reply {{
      internal;
      default_type application/json;
      return 200 '{reply}';
    }}
  }}
}}
"""
    )
    proc = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        services.wait_for(lambda: _answers(url), 10, what="nginx")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(prefix, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        return requests.post(url + "/v1/chat/completions", data=b"{}", timeout=1).ok
    except requests.RequestException:
        return False


def nginx_binary() -> str | None:
    """nginx's path (PATH, else Debian's /usr/sbin), or None when it is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None


def call_timeline(
    call_log: Path, submit_start: float, submitted: float, completed: float, limit: int
) -> dict[str, Any]:
    """Where a latency-bound run's time went, from nginx's log of the calls: every second a
    slot of the model's limit is not in an upstream call is lost, and the phases say where.
    ``submit_s`` (``submit_batch``), ``first_call_s`` and ``limit_reached_s`` (the first and
    the ``limit``-th call, after ``submit_batch`` returned), ``slot_use`` (slot-seconds in
    calls over ``limit`` x the span from the first call to the last reply), the idle time of
    a slot between two calls on one connection (a reply to the next request: write-back,
    hand-off, send), and ``after_last_reply_s`` (until the batch read ``completed``)."""
    calls = []
    for line in call_log.read_text().splitlines():
        end_s, took_s, connection = line.split()
        end, took = float(end_s), float(took_s)
        if end - took >= submit_start:  # not the bare loop's calls, made before
            calls.append((end - took, end, connection))
    if len(calls) < limit:
        return {"not_measured": f"only {len(calls)} calls in nginx's log"}
    calls.sort()
    first, last_end = calls[0][0], max(c[1] for c in calls)
    busy = sum(end - start for start, end, _ in calls)
    previous_end: dict[str, float] = {}
    idle = []
    for start, end, connection in calls:
        if connection in previous_end:
            idle.append(start - previous_end[connection])
        previous_end[connection] = end
    idle.sort()
    return {
        "submit_s": round(submitted - submit_start, 3),
        "first_call_s": round(first - submitted, 3),
        "limit_reached_s": round(calls[limit - 1][0] - submitted, 3),
        "last_reply_s": round(last_end - submitted, 3),
        "after_last_reply_s": round(completed - last_end, 3),
        "slot_use": round(busy / (limit * (last_end - first)), 3),
        "idle_between_calls_ms": {
            "mean": round(1000 * sum(idle) / max(1, len(idle)), 1),
            "p50": round(1000 * idle[len(idle) // 2], 1) if idle else None,
            "p90": round(1000 * idle[len(idle) * 9 // 10], 1) if idle else None,
        },
    }


def instant_upstream(use_nginx: bool) -> Any:
    return nginx_upstream() if use_nginx else mock_upstream(0)


def upstream_label(use_nginx: bool, latency_ms: float = 0, stream: bool = False) -> str:
    if not use_nginx:
        return "mock-upstream (aiohttp)" + (", streamed" if stream else "")
    if stream:
        chunked = "one chunk per event" if ECHO_MODULE.exists() else "one body"
        return f"nginx (fixed event stream, {chunked})"
    if latency_ms:
        return f"nginx (fixed reply after echo_sleep {latency_ms / 1000:g} s)"
    return "nginx (fixed reply)"


def cluster_client(env: dict[str, str]) -> Any:
    """A Client (and this process's Celery app) configured for the cluster's env."""
    from fusillade_celery.app import configure
    from fusillade_celery.settings import Settings
    from fusillade_celery.submit import Client

    settings = Settings.from_env(env)
    configure(settings)
    return Client(settings)


def wait_completed(client: Any, batch_id: str, poll_s: float) -> None:
    while client.get_batch(batch_id, counts_max_age_s=1.0)["status"] != "completed":
        time.sleep(poll_s)


def bare_loop(url: str, n: int, repeats: int = 3) -> float:
    """Requests per second of one requests.Session posting sequentially: the reference. The
    best of ``repeats`` runs of ``n // repeats``: this machine's speed drifts between runs, and
    the best run is the conservative reference for a ratio."""
    session = requests.Session()
    body = _line(0, "bench").encode()
    best = 0.0
    per_run = max(1, n // repeats)
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_run):
            session.post(url + "/v1/chat/completions", data=body, timeout=30).raise_for_status()
        best = max(best, per_run / (time.perf_counter() - start))
    return best


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
        procs: list[subprocess.Popen[bytes]] = []

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
            # Worker pids (the first ``workers`` after beat) for the RSS figures.
            env["BENCH_WORKER_PIDS"] = ",".join(str(p.pid) for p in procs[1:])
            yield env
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                p.wait(30)
            services.drop_database(admin, name)
            shutil.rmtree(logdir, ignore_errors=True)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, /proc/stat): the delta over a
    run is what the run cost, steadier across runs than a rate on a machine whose speed
    drifts."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pids: list[str]) -> float:
    """User + system CPU seconds of these processes so far (/proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        try:
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(parts[11]) + int(parts[12])
    return total / os.sysconf("SC_CLK_TCK")


def worker_pids(env: dict[str, str]) -> list[str]:
    """The cluster's worker process ids (``cluster`` records them in the env it yields)."""
    return env["BENCH_WORKER_PIDS"].split(",")


def worker_rss_mb(env: dict[str, str]) -> list[float]:
    """Resident set size of each worker process, from /proc."""
    out = []
    for pid in worker_pids(env):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        out.append(round(kb / 1024, 1))
    return out


def run_distributed(
    n: int,
    latency_ms: float,
    limit: int,
    workers: int,
    concurrency: int,
    extra: dict[str, str] | None = None,
    use_nginx: bool = False,
    stream: bool = False,
) -> dict[str, Any]:
    """One distributed run; ``stream``: every call streamed (FUSILLADE_STREAM_ENDPOINTS) and
    reassembled."""
    if stream:
        extra = {**(extra or {}), "FUSILLADE_STREAM_ENDPOINTS": "/v1/chat/completions"}
    with tempfile.TemporaryDirectory() as tmp:
        call_log = Path(tmp) / "calls.log" if use_nginx and latency_ms else None
        if use_nginx:
            upstream_cm = nginx_upstream(latency_ms / 1000.0, call_log, sse=stream)
        else:
            upstream_cm = mock_upstream(latency_ms)
        with upstream_cm as url:
            src = write_input(Path(tmp) / "in.jsonl", n)
            env_extra = {
                "FUSILLADE_UPSTREAM_URL": url,
                "FUSILLADE_MODEL_LIMITS": f"bench={limit}",
                "FUSILLADE_CLAIM_BATCH_SIZE": str(max(limit, 100)),
                **(extra or {}),
            }
            bare_n = min(n, 6000) if latency_ms == 0 else 3
            bare = bare_loop(url, bare_n)
            with cluster(env_extra, workers, concurrency) as env:
                client = cluster_client(env)
                if not use_nginx:
                    requests.post(url + "/_mock/reset", timeout=5)
                busy0, workers0 = machine_busy_s(), process_cpu_s(worker_pids(env))
                start, start_wall = time.perf_counter(), time.time()
                batch_id = client.submit_batch(src)
                submitted = time.perf_counter()
                submitted_wall = time.time()
                wait_completed(client, batch_id, 0.05)
                elapsed = time.perf_counter() - start
                completed_wall = time.time()
                busy = machine_busy_s() - busy0
                workers_cpu = process_cpu_s(worker_pids(env)) - workers0
                counts = client.get_batch(batch_id)["request_counts"]
                rss = worker_rss_mb(env)
            rate = n / elapsed
            out: dict[str, Any] = {
                "requests": n,
                "seconds": round(elapsed, 2),
                "submit_seconds": round(submitted - start, 2),
                "req_per_s": round(rate, 1),
                "bare_loop_req_per_s": round(bare, 1),
                "ratio_to_bare_loop": round(rate / bare, 2),
                # CPU per request (whole machine; the workers alone), from submit to completed.
                "machine_cpu_ms_per_request": round(busy * 1000 / n, 3),
                "worker_cpu_ms_per_request": round(workers_cpu * 1000 / n, 3),
                "completed": counts["completed"],
                "workers": workers,
                "concurrency": concurrency,
                "limit": limit,
                "worker_rss_mb": rss,
                "upstream": upstream_label(use_nginx, latency_ms, stream),
            }
            if not use_nginx:
                first = requests.get(url + "/_mock/stats", timeout=30).json().get("first_call_at")
                if first is not None:
                    out["first_call_after_submit_s"] = round(first - submitted_wall, 3)
            if latency_ms:
                ideal = limit / (latency_ms / 1000.0)
                out["ideal_req_per_s"] = ideal
                out["fraction_of_ideal"] = round(rate / ideal, 2)
        if call_log is not None:  # complete now that nginx has exited
            out["timeline"] = call_timeline(
                call_log, start_wall, submitted_wall, completed_wall, limit
            )
        return out


def run_embedded(n: int, use_nginx: bool = False) -> dict[str, Any]:
    with instant_upstream(use_nginx) as url, tempfile.TemporaryDirectory() as tmp:
        src = write_input(Path(tmp) / "in.jsonl", n)
        env = {
            **os.environ,
            "FUSILLADE_DATABASE_URL": f"sqlite:///{tmp}/state.sqlite3",
            "FUSILLADE_UPSTREAM_URL": url,
            "FUSILLADE_MODEL_LIMITS": "bench=32",
        }
        env.pop("FUSILLADE_BROKER_URL", None)
        bare = bare_loop(url, min(n, 6000))
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
        "upstream": upstream_label(use_nginx),
    }


def _child_json(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (its peak RSS is then its own) and parse the JSON
    object it prints last."""
    res = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


_CHILD_PRELUDE = (
    "import time,resource,json,sys\n"
    "from fusillade_celery.settings import Settings\n"
    "from fusillade_celery.submit import Client\n"
    "def rss(): return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)\n"
)


def claim_statement_ms(
    db_urls: list[str], batch_size: int = 1000, rounds: int = 15
) -> list[dict[str, Any]]:
    """Median time of the claim statement (``Store.claim``: lock, in-flight count, pick and
    update of ``batch_size`` rows) over ``rounds`` claims on each database, the databases
    taking turns round by round (so the machine's drift during the measurement falls on all
    of them alike), with the claimed rows put back to pending (and the table vacuumed) after
    each so every round sees the same table; plus the EXPLAIN of the claim statement
    (``Store.claim_plan``; its scans: the pick must use ``ix_requests_pending`` and nothing may
    scan the table)."""
    from sqlalchemy import text

    from fusillade_celery.db import get_engine
    from fusillade_celery.store import Store

    stores = [Store(get_engine(url)) for url in db_urls]
    plans = [store.claim_plan("bench", "bench", 10**9, batch_size) for store in stores]
    times: list[list[float]] = [[] for _ in stores]
    for _ in range(rounds):
        for store, spent in zip(stores, times, strict=True):
            t0 = time.perf_counter()
            _, rows = store.claim("bench", "bench", 10**9, batch_size, time.time())
            spent.append((time.perf_counter() - t0) * 1000)
            with store.engine.begin() as conn:  # benchmark setup: put them back
                conn.execute(
                    text(
                        "UPDATE requests SET state='pending', claim_token=NULL, "
                        "routed_model=NULL WHERE id = ANY(:ids)"
                    ),
                    {"ids": [r.id for r in rows]},
                )
            # What autovacuum does between claims in a real run; without it the put-back
            # rows' dead index entries pile up and every round reads more of them.
            with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE requests"))
    out = []
    for spent, plan in zip(times, plans, strict=True):
        scans = [
            line.strip().removeprefix("->  ").split("  (cost")[0]
            for line in plan
            if "Scan" in line and " on requests " in line
        ]
        spent.sort()
        out.append(
            {
                "claim_rows": batch_size,
                "claim_ms_median": round(spent[len(spent) // 2], 2),
                "uses_index": any("ix_requests_pending" in line for line in scans)
                and not any("Seq Scan" in line for line in scans),
                "plan_scans": scans,
            }
        )
    return out


def run_scale(n: int, small: int = 10_000) -> dict[str, Any]:
    """Targets 3 and 4: submit ``n`` lines (time, peak RSS of the submitting process), the
    claim statement's time at ``small`` and at ``n`` pending rows (measured in turns), and the
    results stream (every row marked completed, then ``iter_results`` read in a fresh
    process)."""
    from sqlalchemy import text

    from fusillade_celery.db import get_engine, normalize_url
    from fusillade_celery.migrate import upgrade

    out: dict[str, Any] = {"lines": n}
    with services.postgres_server() as admin, tempfile.TemporaryDirectory() as tmp:
        names, urls, batches = [], [], []
        for size in (small, n):
            name = services.create_database(admin)
            db_url = normalize_url(services.with_db(admin, name))
            upgrade(get_engine(db_url))
            src = write_input(Path(tmp) / f"in-{size}.jsonl", size)
            sub = _child_json(
                _CHILD_PRELUDE + f"c=Client(Settings().replace(database_url={db_url!r},"
                "upstream_url='http://127.0.0.1:9'))\n"
                f"t=time.perf_counter();b=c.submit_batch({str(src)!r});s=time.perf_counter()-t\n"
                "print(json.dumps({'batch':b,'submit_seconds':round(s,2),'peak_rss_mb':rss()}))"
            )
            names.append(name)
            urls.append(db_url)
            batches.append(sub["batch"])
            if size == n:
                out["bytes"] = src.stat().st_size
                out["submit_seconds"] = sub["submit_seconds"]
                out["submit_lines_per_s"] = round(size / sub["submit_seconds"])
                out["submit_peak_rss_mb"] = sub["peak_rss_mb"]
        at_small, at_large = claim_statement_ms(urls)
        out[f"claim_at_{small}_pending"] = at_small
        out[f"claim_at_{n}_pending"] = at_large
        out["claim_ratio_large_to_small"] = round(
            at_large["claim_ms_median"] / at_small["claim_ms_median"], 2
        )
        db_url = urls[1]
        with get_engine(db_url).begin() as conn:  # benchmark setup: all completed
            conn.execute(
                text(
                    "UPDATE requests SET state='completed', response_status=200, "
                    "completed_at=extract(epoch from now()), "
                    'response_body=\'{"id":"c","object":"chat.completion",'
                    '"choices":[]}\''
                )
            )
        out["results_stream"] = _child_json(
            _CHILD_PRELUDE + f"c=Client(Settings().replace(database_url={db_url!r}))\n"
            "t=time.perf_counter();k=0;marks=[]\n"
            f"for line in c.iter_results({batches[1]!r}):\n"
            "    k+=1\n"
            f"    if k in ({n // 10},{n}): marks.append(rss())\n"
            "r=time.perf_counter()-t\n"
            "print(json.dumps({'lines':k,'lines_per_s':round(k/r),"
            "'rss_mb_at_10pct_and_end':marks}))"
        )
        out["purge_beside_live_rows"] = purge_beside(db_url, Path(tmp) / f"in-{small}.jsonl")
        for name, url in zip(names, urls, strict=True):
            get_engine(url).dispose()
            services.drop_database(admin, name)
    return out


def purge_beside(db_url: str, src: Path) -> dict[str, Any]:
    """Submit ``src`` as a batch next to the rows already in ``db_url``, delete the batch and
    its file, and time the purge (unthrottled): the template chunks must not read the other
    rows (they once scanned every request, 8 s a chunk next to 100,000)."""
    from fusillade_celery import maintenance
    from fusillade_celery.settings import Settings
    from fusillade_celery.submit import Client

    settings = Settings().replace(
        database_url=db_url, upstream_url="http://127.0.0.1:9", purge_throttle_ms=0
    )
    client = Client(settings, notify=False)
    batch_id = client.submit_batch(src)
    file_id = client.get_batch(batch_id)["input_file_id"]
    client.delete_batch(batch_id)
    client.delete_file(file_id)
    start = time.time()  # the chunks' own clock (maintenance.purge)
    chunks = maintenance.purge(client.store, settings)
    spent = time.time() - start
    ends = [start, *(at for at, _ in chunks)]
    times = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {
        "rows": sum(n for _, n in chunks),
        "chunks": len(chunks),
        "seconds": round(spent, 2),
        "slowest_chunk_ms": round(1000 * max(times), 1) if times else None,
    }


def run_memory(first: int, total: int, workers: int, concurrency: int, use_nginx: bool) -> dict:
    """Target 5: worker RSS after ``first`` requests and after ``total`` (same workers)."""
    with instant_upstream(use_nginx) as url, tempfile.TemporaryDirectory() as tmp:
        env_extra = {"FUSILLADE_UPSTREAM_URL": url, "FUSILLADE_MODEL_LIMITS": "bench=1000"}
        with cluster(env_extra, workers, concurrency) as env:
            client = cluster_client(env)
            marks: list[dict[str, Any]] = []
            done = 0
            for size in (first, total - first):
                src = write_input(Path(tmp) / f"in-{size}.jsonl", size)
                wait_completed(client, client.submit_batch(src), 0.2)
                done += size
                marks.append({"after_requests": done, "worker_rss_mb": worker_rss_mb(env)})
    first_rss = sum(marks[0]["worker_rss_mb"])
    last_rss = sum(marks[-1]["worker_rss_mb"])
    return {"marks": marks, "growth": round(last_rss / first_rss - 1, 3)}


SCENARIOS = (
    "instant",
    "instant-queue",
    "instant-stream",
    "latency",
    "latency-nginx",
    "latency-stream",
    "embedded",
    "scale",
    "memory",
    "api-upload",
    "api-poll",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--instant-requests", type=int, default=20_000)
    p.add_argument("--instant-limit", type=int, default=1000)
    p.add_argument("--latency-requests", type=int, default=10_000)
    p.add_argument("--latency-limit", type=int, default=1000)
    p.add_argument(
        "--no-nginx", action="store_true", help="use the aiohttp mock even if nginx is installed"
    )
    p.add_argument("--embedded-requests", type=int, default=5000)
    p.add_argument("--scale-lines", type=int, default=1_000_000)
    p.add_argument("--upload-lines", type=int, default=1_000_000)
    p.add_argument("--memory-requests", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=100)
    args = p.parse_args(argv)
    wanted = args.scenarios.split(",")
    if unknown := sorted(set(wanted) - set(SCENARIOS)):
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    use_nginx = nginx_binary() is not None and not args.no_nginx
    result: dict[str, Any] = {
        "machine": {"cores": os.cpu_count()},
        "nginx": "used for the instant upstream"
        if use_nginx
        else "not used (not installed or --no-nginx): mock-upstream for every scenario",
    }
    # instant-queue: no slot hand-off, every request travels claim, broker and start (what the
    # hand-off saves).
    for name, extra in (
        ("instant", None),
        ("instant-queue", {"FUSILLADE_HANDOFF_WINDOW_MS": "0"}),
    ):
        if name in wanted:
            result[name] = run_distributed(
                args.instant_requests,
                0,
                args.instant_limit,
                args.workers,
                args.concurrency,
                extra=extra,
                use_nginx=use_nginx,
            )
    # Streamed: the instant upstream sends a fixed event stream (nginx, else the mock), the
    # latency one is the mock (it streams its reply after the latency).
    if "instant-stream" in wanted:
        result["instant-stream"] = run_distributed(
            args.instant_requests,
            0,
            args.instant_limit,
            args.workers,
            args.concurrency,
            use_nginx=use_nginx,
            stream=True,
        )
    if "latency-stream" in wanted:
        result["latency-stream"] = run_distributed(
            args.latency_requests,
            1000,
            args.latency_limit,
            args.workers,
            max(args.concurrency, args.latency_limit),
            stream=True,
        )
    # latency on the aiohttp mock (it also reports the first call after submit) and, when
    # nginx has its echo module, on nginx (the same 1 s, without the mock's CPU). -c = the
    # limit on every worker: uneven delivery of the model's messages must not leave one
    # worker's semaphore full while the other idles.
    for name, on_nginx in (("latency", False), ("latency-nginx", True)):
        if name not in wanted:
            continue
        if on_nginx and not (use_nginx and ECHO_MODULE.exists()):
            result[name] = {"not_run": f"needs nginx and {ECHO_MODULE} (--no-nginx, or missing)"}
            continue
        result[name] = run_distributed(
            args.latency_requests,
            1000,
            args.latency_limit,
            args.workers,
            max(args.concurrency, args.latency_limit),
            use_nginx=on_nginx,
        )
    if "embedded" in wanted:
        result["embedded"] = run_embedded(args.embedded_requests, use_nginx)
    if "scale" in wanted:
        result["scale"] = run_scale(args.scale_lines)
    if "memory" in wanted:
        result["memory"] = run_memory(
            args.memory_requests // 10,
            args.memory_requests,
            args.workers,
            args.concurrency,
            use_nginx,
        )
    if "api-upload" in wanted or "api-poll" in wanted:
        from . import api

        if "api-upload" in wanted:
            result["api-upload"] = api.run_upload(args.upload_lines)
        if "api-poll" in wanted:
            result["api-poll"] = api.run_poll()
    result["bench_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
