"""What the outage tests check and how they report it: every request ended exactly once with
a response the upstream sent, the requests sent upstream again after their answer had come
back (counted from the mock's call log, put down to the fault they met), the cluster's
warnings, and the workers' heartbeat silences."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..services import wait_for
from .conftest import Cluster, Processes


def completed(c: Cluster, batch_id: str) -> int:
    return int(c.client.get_batch(batch_id)["request_counts"]["completed"])


def state_counts(c: Cluster, batch_id: str) -> dict[str, int]:
    return dict(Counter(r["state"] for r in c.client.store.request_rows(batch_id)))


def wait_finished(c: Cluster, batch_id: str, timeout: float, problems: list[str]) -> dict[str, Any]:
    """The batch once it reached a terminal status; on timeout a problem naming the states its
    requests are stuck in, and the batch as it is."""
    try:
        return c.wait_done(batch_id, timeout)
    except AssertionError as exc:
        problems.append(f"{exc}; request states now: {state_counts(c, batch_id)}")
        return c.client.get_batch(batch_id)


def settle(predicate: Any, timeout: float, what: str, problems: list[str]) -> None:
    """``wait_for``, a timeout noted as a problem rather than raised (the checks after it
    still run, so one run shows every failure)."""
    try:
        wait_for(predicate, timeout, interval=0.1, what=what)
    except AssertionError as exc:
        problems.append(str(exc))


def alive(procs: Processes) -> dict[str, int]:
    """name -> pid of the cluster's celery processes that are running."""
    return {name: p.pid for name, p in procs.c.procs.items() if p.poll() is None}


def check_no_restart(procs: Processes, before: dict[str, int], problems: list[str]) -> None:
    now = alive(procs)
    if now != before:
        problems.append(f"celery processes changed: before {before}, now {now} (see the logs)")


@dataclass(frozen=True)
class Duplicate:
    custom_id: str
    answered: dict[str, Any]  # an earlier call of the custom_id, answered
    again: dict[str, Any]  # a later call of it


def answered(call: dict[str, Any]) -> bool:
    return call.get("outcome") == "ok" and int(call.get("status", 0)) < 400


def duplicate_sends(calls: dict[str, list[dict[str, Any]]]) -> list[Duplicate]:
    """Every call of a custom_id that came after an earlier call of it had been answered
    (``calls``: ``Cluster.calls_for``, each custom_id's calls in arrival order). A call
    sent again after a timeout, a reset or a 5xx is not one: its answer never came."""
    out: list[Duplicate] = []
    for cid, cs in calls.items():
        first = next((i for i, call in enumerate(cs) if answered(call)), None)
        if first is not None:
            out.extend(Duplicate(cid, cs[first], again) for again in cs[first + 1 :])
    return out


def phase(t: float, marks: list[tuple[str, float]]) -> str:
    """The name of the last mark at or before ``t`` (``marks`` in time order)."""
    name = "before " + marks[0][0]
    for mark, at in marks:
        if t >= at:
            name = mark
    return name


def describe(dups: list[Duplicate], marks: list[tuple[str, float]]) -> str:
    """Duplicates counted by (when the answered call ended, when the next one started), with
    a few examples (times relative to the first mark)."""
    t0 = marks[0][1]
    by_cause = Counter(
        (phase(d.answered["end"], marks), phase(d.again["start"], marks)) for d in dups
    )
    lines = [f"  {n} answered {a!r} -> sent again {b!r}" for (a, b), n in sorted(by_cause.items())]
    for d in dups[:5]:
        lines.append(
            f"    e.g. {d.custom_id}: call {d.answered['call']} "
            f"{d.answered['start'] - t0:+.2f}..{d.answered['end'] - t0:+.2f}s ok, "
            f"call {d.again['call']} {d.again['start'] - t0:+.2f}s -> {d.again.get('outcome')}"
        )
    return "\n".join(lines)


def report_duplicates(
    calls: dict[str, list[dict[str, Any]]], marks: list[tuple[str, float]], what: str
) -> tuple[list[Duplicate], str]:
    """The duplicate sends among ``calls`` and their description (printed). Calls that the
    worker abandoned mid-way (the upstream saw the connection close) and that were sent
    again are printed too: not duplicates (no answer was thrown away), but upstream work
    wasted."""
    dups = duplicate_sends(calls)
    text = f"{what}: {len(dups)} duplicate upstream sends" + (
        ":\n" + describe(dups, marks) if dups else ""
    )
    abandoned = sum(
        1 for cs in calls.values() for e in cs[:-1] if e.get("outcome") == "disconnected"
    )
    print(text + f"\n{what}: {abandoned} calls abandoned mid-way and sent again")
    return dups, text


def check_exactly_once(
    c: Cluster, batch_id: str, batch: dict[str, Any], prefix: str, n: int, problems: list[str]
) -> None:
    """Completed, every request once: n output lines, one per custom_id, each a response the
    upstream really sent for that custom_id; no error line."""
    if batch["status"] != "completed" or batch["request_counts"] != {
        "total": n,
        "completed": n,
        "failed": 0,
    }:
        problems.append(
            f"batch {batch['status']} with {batch['request_counts']} "
            f"(request states {state_counts(c, batch_id)})"
        )
    out = list(c.client.iter_results(batch_id))
    ids = Counter(o["custom_id"] for o in out)
    repeated = {cid: k for cid, k in ids.items() if k > 1}
    if len(out) != n or repeated:
        problems.append(f"{len(out)} output lines for {n} requests; repeated: {repeated}")
    missing = {f"{prefix}{i:04d}" for i in range(n)} - set(ids)
    if missing:
        problems.append(f"{len(missing)} custom_ids have no output line: {sorted(missing)[:5]}")
    errors = list(c.client.iter_results(batch_id, errors=True))
    if errors:
        problems.append(f"{len(errors)} error lines, e.g. {errors[:2]}")
    served = {
        cid: {f"chatcmpl-mock-{e['seq']}" for e in calls if answered(e)}
        for cid, calls in c.calls_for(prefix).items()
    }
    fake = [
        o["custom_id"]
        for o in out
        if o["response"]["body"]["id"] not in served.get(o["custom_id"], ())
    ]
    if fake:
        problems.append(f"{len(fake)} outputs are no response the upstream sent: {fake[:5]}")


def frozen_mid_call(d: Duplicate, stopped: float, resumed: float) -> bool:
    """Whether a duplicate is one a frozen worker cannot avoid: a call it had begun when it
    was frozen, either already with the upstream (answered before or during the freeze, sent
    again by the worker that took the row over) or not yet (its check that the row was still
    its own passed before the freeze, its bytes left after SIGCONT, within a second, while
    the worker that took the row over had sent it meanwhile)."""
    if d.answered["start"] < stopped <= d.again["start"] < resumed:
        return True
    return stopped <= d.answered["start"] and resumed <= d.again["start"] <= resumed + 1.0


def check_second_batch(c: Cluster, batch_id: str, prefix: str, n: int, problems: list[str]) -> None:
    """A batch run after the fault: finished within 30 s, exactly once, nothing resent."""
    batch = wait_finished(c, batch_id, 30, problems)
    check_exactly_once(c, batch_id, batch, prefix, n, problems)
    dups, text = report_duplicates(c.calls_for(prefix), [("the second batch", 0.0)], "second batch")
    if dups:
        problems.append(text)


def log_summary(c: Cluster, limit: int = 20) -> str:
    """The cluster's WARNING / ERROR / CRITICAL log lines, counted by shape (numbers, ids and
    hex normalised), most frequent first, per log file."""
    out = []
    for path in sorted(c.log_dir.glob("*.log")):
        shapes: Counter[str] = Counter()
        for text in path.read_text(errors="replace").splitlines():
            if not re.search(r"\b(WARNING|ERROR|CRITICAL)\b", text):
                continue
            msg = re.sub(r"^\[[^\]]*\]\s*", "", text)
            msg = re.sub(
                r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", msg
            )
            msg = re.sub(r"[0-9a-f]{8,}", "<hex>", msg)
            msg = re.sub(r"\d+(\.\d+)?", "N", msg)
            shapes[msg[:160]] += 1
        if shapes:
            out.append(f"{path.name}:")
            out.extend(f"  {k:5d}x {m}" for m, k in shapes.most_common(limit))
    return "\n".join(out) or "(no warnings or errors logged)"


class HeartbeatWatch:
    """Samples the workers table every ``interval`` s in a thread while open, keeping per
    worker process the longest heartbeat silence seen (``now - last_heartbeat`` at its worst,
    and when), so a worker whose whole process stalled shows. Samples that fail (the database
    away) are skipped."""

    def __init__(self, c: Cluster, procs: Processes, interval: float = 0.25):
        self.c = c
        self.names = {p.pid: name for name, p in procs.c.procs.items()}
        self.interval = interval
        self.worst: dict[str, tuple[float, float]] = {}  # name -> (silence s, at)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                rows = self.c.client.store.worker_rows()
            except Exception:  # noqa: BLE001 - the database may be away
                continue
            now = time.time()
            for w in rows:
                name = self.names.get(w["pid"])
                if name is not None and w["status"] == "alive":
                    age = now - w["last_heartbeat"]
                    if age > self.worst.get(name, (0.0, 0.0))[0]:
                        self.worst[name] = (age, now)

    def summary(self, t0: float) -> str:
        return ", ".join(
            f"{name} {age:.1f} s (at {at - t0:+.1f} s)"
            for name, (age, at) in sorted(self.worst.items())
        )

    def __enter__(self) -> HeartbeatWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def verdict(c: Cluster, problems: list[str]) -> None:
    assert not problems, "\n".join(problems) + "\n--- cluster log summary ---\n" + log_summary(c)
