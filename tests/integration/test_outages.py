"""Outages on real processes (beat and two gevent workers of ``running_cluster``): PostgreSQL
or Redis gone for 20 s mid-batch, a worker frozen (SIGSTOP) past the stale-worker threshold,
an upstream that accepts connections and never answers. No process is restarted: each must
recover by itself.

Every test checks that each request ended exactly once (one output line per custom_id, each a
response the upstream really sent for it) and counts the duplicate upstream sends in the
mock's call log: a call of a custom_id made after an earlier call of it had been answered
(``outcome`` ok, status < 400), i.e. a request sent again although its answer had come back.
The causes of any are named by when the two calls happened relative to the fault. Problems
are collected and asserted together at the end, with the cluster's warnings and errors, so one
run shows everything that went wrong."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from fusillade_celery.db import dispose_all

from .. import services
from ..conftest import line
from ..services import wait_for
from .conftest import Cluster, migrated_template, running_cluster
from .outage_checks import (
    HeartbeatWatch,
    alive,
    check_exactly_once,
    check_no_restart,
    check_second_batch,
    completed,
    describe,
    duplicate_sends,
    frozen_mid_call,
    report_duplicates,
    settle,
    state_counts,
    verdict,
    wait_finished,
)

pytestmark = pytest.mark.integration

OUTAGE_S = 20.0
#: Short reclaim timeouts, so recovery fits in a test (the brief's values).
RECLAIM = {
    "FUSILLADE_CLAIM_TIMEOUT_MS": "5000",
    "FUSILLADE_HEARTBEAT_INTERVAL_MS": "500",
    "FUSILLADE_STALE_WORKER_THRESHOLD_MS": "3000",
    "FUSILLADE_PROCESSING_TIMEOUT_MS": "60000",
}
STALE_S = int(RECLAIM["FUSILLADE_STALE_WORKER_THRESHOLD_MS"]) / 1000.0


# ---------------------------------------------------------------------------- 1. PostgreSQL


@pytest.fixture
def private_pg() -> Iterator[services.PostgresServer]:
    with services.PostgresServer() as pg:
        try:
            yield pg
        finally:
            dispose_all()  # this process's engines, before their server goes


def test_postgres_down_20s_mid_batch(
    private_pg: services.PostgresServer, redis_base: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A private PostgreSQL stopped (``pg_ctl stop -m immediate``: a crash) while 40 requests
    are in flight, started again 20 s later on the same port and data. Workers and beat go on
    by themselves; every request is sent upstream once and written once."""
    pg = private_pg
    with running_cluster(
        pg.url,
        migrated_template(pg.url),
        redis_base,
        tmp_path_factory.mktemp("pg-outage"),
        redis_db=5,
        models=("pgo",),
        env_extra={"FUSILLADE_MODEL_LIMITS": "pgo=40", **RECLAIM},
    ) as (c, procs):
        problems: list[str] = []
        pids = alive(procs)
        n = 600
        batch_id = c.client.submit_batch(
            [line(f"pg-{i:04d}", model="pgo", mock_latency_ms=200) for i in range(n)]
        )
        wait_for(lambda: completed(c, batch_id) >= 100, 60, what="progress before the outage")
        before = state_counts(c, batch_id)
        down = time.time()
        pg.stop("immediate")
        try:
            time.sleep(OUTAGE_S)
        finally:
            pg.start()
        up = time.time()
        with HeartbeatWatch(c, procs, interval=0.1) as beats:
            wait_for(lambda: state_counts(c, batch_id), 10, what="the database back")
            after = state_counts(c, batch_id)
            time.sleep(1.0)  # the heartbeats' and the reaper's first passes
        print(f"states at the stop {before}, after the restart {after}")
        # Recovery is due well within the processing timeout (60 s): past 30 s a request is
        # stuck. The wait then goes on to the end, so the checks below still run.
        batch = wait_finished(c, batch_id, 30, problems)
        if batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            batch = wait_finished(c, batch_id, 90, problems)
        print(
            f"finished {time.time() - up:.1f} s after the restart; heartbeat silences seen "
            f"after it: {beats.summary(up)}"
        )
        check_no_restart(procs, pids, problems)
        check_exactly_once(c, batch_id, batch, "pg-", n, problems)
        marks = [("the stop", down), ("the restart", up)]
        dups, text = report_duplicates(c.calls_for("pg-"), marks, "pg outage")
        if dups:
            problems.append(text)
        verdict(c, problems)


# ---------------------------------------------------------------------------- 2. Redis


def test_redis_down_20s_mid_batch(
    pg_admin: str, pg_template: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A private redis-server killed mid-batch and started again, empty, 20 s later on the same
    port. The hand-off window is 2 s here (30 s by default), so the batch needs the broker
    during the outage: messages end, and new work goes claim -> publish -> consume. The
    workers' heartbeats (to the database, which stays up) must go on meanwhile: a worker that
    cannot reach the broker is not dead, and a silence past the stale-worker threshold lets
    the reaper take back requests it is still running."""
    with (
        services.RedisServer() as rs,
        running_cluster(
            pg_admin,
            pg_template,
            rs.url,
            tmp_path_factory.mktemp("redis-outage"),
            redis_db=6,
            models=("rdo",),
            env_extra={
                "FUSILLADE_MODEL_LIMITS": "rdo=40",
                "FUSILLADE_HANDOFF_WINDOW_MS": "2000",
                **RECLAIM,
            },
        ) as (c, procs),
    ):
        problems: list[str] = []
        pids = alive(procs)
        n = 600
        batch_id = c.client.submit_batch(
            [line(f"rd-{i:04d}", model="rdo", mock_latency_ms=200) for i in range(n)]
        )
        wait_for(lambda: completed(c, batch_id) >= 100, 60, what="progress before the outage")
        with HeartbeatWatch(c, procs) as beats:
            down = time.time()
            at_kill = state_counts(c, batch_id)
            rs.kill()
            try:
                time.sleep(OUTAGE_S)
                at_restart = state_counts(c, batch_id)
            finally:
                rs.start()
            up = time.time()
            batch = wait_finished(c, batch_id, 120, problems)
        print(
            f"states at the kill {at_kill}, at the restart {at_restart}; finished "
            f"{time.time() - up:.1f} s after it; longest heartbeat silences: {beats.summary(down)}"
        )
        check_no_restart(procs, pids, problems)
        silent = {name: age for name, (age, _) in beats.worst.items() if age >= STALE_S}
        if silent:
            problems.append(
                f"worker heartbeats stopped while only the broker was away: {beats.summary(down)}"
                f" (stale threshold {STALE_S} s): the reaper takes such a worker's requests "
                "back while it still runs them"
            )
        check_exactly_once(c, batch_id, batch, "rd-", n, problems)
        marks = [("the kill", down), ("the restart", up)]
        dups, text = report_duplicates(c.calls_for("rd-"), marks, "redis outage")
        if dups:
            problems.append(text)
        verdict(c, problems)


# ---------------------------------------------------------------------------- 3. SIGSTOP


def worker_row(c: Cluster, pid: int) -> dict[str, Any]:
    """The workers-table row of the (alive) worker process ``pid``."""
    rows = [w for w in c.client.store.worker_rows() if w["pid"] == pid]
    assert rows, f"no workers row for pid {pid}"
    return max(rows, key=lambda w: w["started_at"])


EXECUTE_DONE = re.compile(r"Task fusillade\.execute\[[^\]]+\] (succeeded|raised)[^\n]*")


def test_frozen_worker_is_fenced_and_carries_on(
    pg_admin: str, pg_template: str, redis_base: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A worker is frozen (SIGSTOP to its process group) past the stale-worker threshold while
    it holds more requests in ``processing`` than its ``-c`` (20): some in flight upstream,
    the others waiting for one of its slots (the model's limit, 60, is more than the two
    workers' -c together). The reaper hands them back and the other worker finishes the batch.
    Then SIGCONT: its late results are fenced out (no row changes), it sends nothing it no
    longer holds, and it runs a second batch alone (the other worker stopped) as a healthy
    worker.

    Sending again what was in flight on the frozen worker is inherent (a frozen worker cannot
    be told from a dead one): those duplicates are expected, no other."""
    with running_cluster(
        pg_admin,
        pg_template,
        redis_base,
        tmp_path_factory.mktemp("sigstop"),
        redis_db=6,
        models=("frz",),
        env_extra={"FUSILLADE_MODEL_LIMITS": "frz=60", **RECLAIM},
    ) as (c, procs):
        problems: list[str] = []
        ids = {name: worker_row(c, c.procs[name].pid)["id"] for name in ("w1", "w2")}
        n = 400
        batch_id = c.client.submit_batch(
            [line(f"fz-{i:04d}", model="frz", mock_latency_ms=500) for i in range(n)]
        )

        def held() -> dict[str, dict[int, str]]:
            """name -> the rows (id -> custom_id) each worker holds in ``processing``."""
            out: dict[str, dict[int, str]] = {name: {} for name in ids}
            for r in c.client.store.request_rows(batch_id):
                for name, wid in ids.items():
                    if r["state"] == "processing" and r["worker_id"] == wid:
                        out[name][r["id"]] = r["custom_id"]
            return out

        def more_than_its_c() -> str | None:
            return next((name for name, rows in held().items() if len(rows) > 20), None)

        victim = wait_for(more_than_its_c, 30, what="a worker to hold more requests than its -c")
        other = "w2" if victim == "w1" else "w1"
        pid, wid = c.procs[victim].pid, ids[victim]
        log = c.log_dir / f"{victim}.log"
        stopped = time.time()
        os.killpg(pid, signal.SIGSTOP)
        try:
            frozen_rows = held()[victim]
            batch = wait_finished(c, batch_id, 60, problems)
            snapshot = {r["id"]: r for r in c.client.store.request_rows(batch_id)}
        finally:
            offset = log.stat().st_size
            resumed = time.time()
            os.killpg(pid, signal.SIGCONT)
        print(
            f"{victim} frozen {resumed - stopped:.1f} s holding {len(frozen_rows)} "
            "requests in processing"
        )
        settle(
            lambda: EXECUTE_DONE.search(log.read_text(errors="replace")[offset:]),
            30,
            f"{victim}'s messages to end after SIGCONT",
            problems,
        )
        settle(
            lambda: not c.mock_stats()["in_flight"].get("frz"), 30, "no call in flight", problems
        )
        settle(
            lambda: worker_row(c, pid)["last_heartbeat"] > resumed,
            10,
            f"{victim}'s heartbeat after SIGCONT",
            problems,
        )
        late = [m.group(0) for m in EXECUTE_DONE.finditer(log.read_text(errors="replace")[offset:])]
        print(f"{victim} after SIGCONT: {len(late)} message(s) ended, e.g. {late[:3]}")
        kept = [i for i in frozen_rows if snapshot[i]["worker_id"] == wid]
        if kept:
            problems.append(
                f"{len(kept)} of the frozen worker's {len(frozen_rows)} rows not taken back"
            )
        after = {r["id"]: r for r in c.client.store.request_rows(batch_id)}
        changed = [i for i in snapshot if snapshot[i] != after.get(i)]
        if changed:
            i = changed[0]
            problems.append(
                f"{len(changed)} rows changed after SIGCONT (late results not fenced), e.g. "
                f"{snapshot[i]['custom_id']}: {snapshot[i]['state']} -> {after[i]['state']}"
            )
        check_exactly_once(c, batch_id, batch, "fz-", n, problems)

        marks = [("the SIGSTOP", stopped), ("the SIGCONT", resumed)]
        dups, _ = report_duplicates(c.calls_for("fz-"), marks, "frozen worker")
        inherent = [d for d in dups if frozen_mid_call(d, stopped, resumed)]
        others = [d for d in dups if d not in inherent]
        if others:
            problems.append(
                f"{len(others)} duplicate sends beyond re-sending what the frozen worker had "
                f"in flight ({len(inherent)}):\n" + describe(others, marks)
            )

        # The thawed worker carries on: the other leaves (warm shutdown), a second batch runs
        # on it alone.
        procs.kill(other, signal.SIGTERM)
        m = 60
        second = c.client.submit_batch(
            [line(f"fy-{i:04d}", model="frz", mock_latency_ms=200) for i in range(m)]
        )
        check_second_batch(c, second, "fy-", m, problems)
        runners = Counter(r["worker_id"] for r in c.client.store.request_rows(second))
        if set(runners) != {wid}:
            problems.append(f"second batch run by {dict(runners)}, not by {victim} ({wid}) alone")
        verdict(c, problems)


# ---------------------------------------------------------------------------- 4. silent upstream


def test_upstream_that_never_answers(
    pg_admin: str, pg_template: str, redis_base: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A batch whose upstream accepts connections and never answers: with a 1 s timeout
    every request is retried, then fails ``timeout`` before the batch's deadline (no retry is
    started later than 2 s before it, so the last attempt ends in time), and the model's slots
    are free again: a second batch of the model, to the answering mock, completes."""
    limit = 10
    with (
        services.SilentUpstream() as silent,
        running_cluster(
            pg_admin,
            pg_template,
            redis_base,
            tmp_path_factory.mktemp("silent"),
            redis_db=7,
            models=("hang",),
            env_extra={
                "FUSILLADE_MODEL_LIMITS": f"hang={limit}",
                "FUSILLADE_TIMEOUT_MS": "1000",
                "FUSILLADE_STOP_BEFORE_DEADLINE_MS": "2000",
                **RECLAIM,
            },
        ) as (c, _),
    ):
        problems: list[str] = []
        n = limit
        batch_id = c.client.submit_batch(
            [line(f"hg-{i:04d}", model="hang") for i in range(n)],
            completion_window="12s",
            upstream=silent.url,
        )
        batch = wait_finished(c, batch_id, 30, problems)
        attempts = Counter(silent.custom_ids)
        print(f"silent upstream: {silent.connections} connections, attempts {dict(attempts)}")
        if batch["status"] != "failed" or batch["request_counts"] != {
            "total": n,
            "completed": 0,
            "failed": n,
        }:
            problems.append(f"batch {batch['status']} with {batch['request_counts']}")
        if batch["expired_at"] is not None or (batch["failed_at"] or 0) > batch["expires_at"]:
            problems.append(f"not finished within the deadline: {batch}")
        errors = list(c.client.iter_results(batch_id, errors=True))
        codes = Counter(e["error"]["code"] for e in errors)
        if codes != {"timeout": n} or len({e["custom_id"] for e in errors}) != n:
            problems.append(f"error lines {len(errors)}, codes {dict(codes)}: {errors[:2]}")
        if list(c.client.iter_results(batch_id)):
            problems.append("output lines for a batch no request of which was answered")
        once = [f"hg-{i:04d}" for i in range(n) if attempts[f"hg-{i:04d}"] < 2]
        if once:
            problems.append(f"not retried: {once} (attempts {dict(attempts)})")
        held = {k: v for k, v in state_counts(c, batch_id).items() if k != "failed"}
        if held:
            problems.append(f"rows of the failed batch still hold slots: {held}")

        m = 40
        second = c.client.submit_batch(
            [line(f"hn-{i:04d}", model="hang", mock_latency_ms=200) for i in range(m)]
        )
        check_second_batch(c, second, "hn-", m, problems)
        peak = c.mock_stats()["peak_concurrency"].get("hang", 0)
        if peak != limit:
            problems.append(f"second batch peaked at {peak} in flight, the limit is {limit}")
        verdict(c, problems)


# ---------------------------------------------------------------------------- 5. all of them


def test_chaos_sequence_on_one_batch(
    private_pg: services.PostgresServer, redis_base: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """One batch of 5,000 requests through every fault in turn: a worker killed with
    ``kill -9`` (and a replacement started), the broker flushed, PostgreSQL down for 8 s, the
    other worker frozen past the stale threshold. Every request ends exactly once with a
    response the upstream sent for it; the table printed says, per fault, how many requests
    were sent again after their answer had come back. Only the freeze may cause any (what the
    frozen worker had in flight: a frozen worker cannot be told from a dead one) and the kill
    (an answer received but not yet written back when the process died)."""
    import redis as redis_client

    pg = private_pg
    with running_cluster(
        pg.url,
        migrated_template(pg.url),
        redis_base,
        tmp_path_factory.mktemp("chaos"),
        redis_db=7,
        models=("chs",),
        env_extra={"FUSILLADE_MODEL_LIMITS": "chs=60", **RECLAIM},
    ) as (c, procs):
        problems: list[str] = []
        n = 5000
        batch_id = c.client.submit_batch(
            [line(f"cs-{i:04d}", model="chs", mock_latency_ms=150) for i in range(n)]
        )
        marks: list[tuple[str, float]] = [("the submit", time.time())]

        def at(done: int, what: str) -> None:
            wait_for(lambda: completed(c, batch_id) >= done, 120, what=f"{done} done before {what}")
            marks.append((what, time.time()))

        at(600, "kill -9")
        procs.kill("w1", signal.SIGKILL)
        procs.start_worker("w3")
        at(1600, "broker flush")
        redis_client.Redis.from_url(c.broker_url).flushdb()
        at(2600, "PostgreSQL down")
        pg.stop("immediate")
        try:
            time.sleep(8.0)
        finally:
            pg.start()
        marks.append(("PostgreSQL back", time.time()))
        at(3600, "SIGSTOP")
        pid = c.procs["w2"].pid
        os.killpg(pid, signal.SIGSTOP)
        try:
            time.sleep(STALE_S + 3.0)  # past the threshold and a reaper pass
        finally:
            os.killpg(pid, signal.SIGCONT)
        marks.append(("SIGCONT", time.time()))
        batch = wait_finished(c, batch_id, 180, problems)
        marks.append(("the end", time.time()))
        check_exactly_once(c, batch_id, batch, "cs-", n, problems)
        dups = duplicate_sends(c.calls_for("cs-"))
        # A duplicate is put down to the first fault after its answered call began.
        caused = Counter(
            next((name for name, t in marks if t > d.answered["start"]), "the end") for d in dups
        )
        t0 = marks[0][1]
        print("\nfault              at (s)   sent again after answered")
        for name, when in marks[1:-1]:
            print(f"{name:<18} {when - t0:7.1f}   {caused.get(name, 0)}")
        print(f"batch {batch['status']} {batch['request_counts']} in {marks[-1][1] - t0:.1f} s")
        # Inherent: a call in flight on the killed or frozen worker at the fault (or
        # answered just before it and not yet written back), sent again once its row was
        # reaped (a stale threshold later, possibly during the next fault).
        at_ = dict(marks)
        inherent = [
            d
            for d in dups
            if (
                d.answered["start"] < at_["kill -9"] <= d.again["start"]
                and d.answered["end"] >= at_["kill -9"] - 1.0
            )
            or frozen_mid_call(d, at_["SIGSTOP"], at_["SIGCONT"])
        ]
        beyond = [d for d in dups if d not in inherent]
        if beyond:
            problems.append(
                f"{len(beyond)} duplicate sends beyond what the killed or frozen worker had "
                "in flight:\n" + describe(beyond, marks)
            )
        verdict(c, problems)
