"""``fusillade-celery top``: one frame (``--once``) with models, counts, last errors and a
batch's progress bar; the live view in a pseudo-terminal, quit with q or Ctrl-C."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusillade_celery import claimer, maintenance, top
from fusillade_celery.app import configure
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.settings import Settings
from fusillade_celery.store import BatchProgress, ModelOverview
from fusillade_celery.submit import Client

from .conftest import line
from .test_cli_operator import CLI, clean_env, cli
from .test_execute import Recorder, run_claimed
from .test_visible import unreachable


@pytest.fixture
def scene(pg_url: str, mock: MockUpstream) -> Iterator[tuple[Client, dict[str, str], str, str]]:
    """Model m1 (limit 2) half through a batch of 4 on the mock; model m2's batch retrying
    against a port nothing listens on. Yields the client, the CLI's environment, both ids."""
    dead = unreachable()
    settings = Settings().replace(
        database_url=pg_url,
        broker_url="",
        upstream_url=mock.url,
        model_limits={"m1": 2},
        backoff_ms=60_000,
        max_backoff_ms=60_000,
    )
    configure(settings)
    client = Client(settings)
    half = client.submit_batch([line(f"a{i}") for i in range(4)])
    stuck = client.submit_batch([line("b", model="m2")], upstream=dead)
    rec = Recorder()
    assert claimer.claim_all(client.store, settings, rec.publish) == {"m1": 2, "m2": 1}
    run_claimed(client.store, settings, rec)
    env = clean_env(FUSILLADE_DATABASE_URL=pg_url, FUSILLADE_MODEL_LIMITS="m1=2")
    yield client, env, half, stuck


def row(text: str, first: str) -> list[str]:
    (found,) = [x for x in text.splitlines() if x.startswith(first + " ")]
    return found.split()


def test_once_prints_models_counts_errors_and_progress(scene, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, env, half, stuck = scene
    res = cli(["top", "--once"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith(top.TITLE) and "\x1b" not in out  # not a terminal: plain text
    # Models: limit, in flight, pending, retrying, req/s (unknown in one frame), last error
    assert row(out, "m1")[:6] == ["m1", "2", "0", "2", "0", "-"]
    m2 = row(out, "m2")
    assert m2[:6] == ["m2", "10", "0", "0", "1", "-"]
    host = client.store.model_errors()["m2"].host
    assert f"network_error at {host}" in " ".join(m2)
    # Batches: status, a half-full bar, done/total, failed, retrying, rate, ETA
    assert row(out, half)[1:7] == ["in_progress", "[##########..........]", "50%", "2/4", "0", "0"]
    assert row(out, stuck)[1:7] == ["in_progress", "[....................]", "0%", "0/1", "0", "1"]


def test_rates_and_eta_come_from_frames(scene) -> None:  # type: ignore[no-untyped-def]
    client, _, half, _ = scene
    now = [1000.0]
    sampler = top.Sampler(client.store, client.settings, clock=lambda: now[0])
    first = sampler.frame()
    assert first.model_rates == {} and first.batch_rates == {}
    # When the rest of the batch completes over 2 s
    rec = Recorder()
    claimer.claim_model(client.store, client.settings, rec.publish, "m1")
    run_claimed(client.store, client.settings, rec)
    maintenance.finalize(client.store, client.settings)  # the batch leaves the running ones
    now[0] += 2.0
    second = sampler.frame()
    # Then 2 requests in 2 s, for the batch and its model; the ended batch stays on screen
    assert second.batch_rates[half] == pytest.approx(1.0)
    assert second.model_rates["m1"] == pytest.approx(1.0)
    (done,) = [b for b in second.batches if b.id == half]
    assert (done.status.value, done.done, done.total) == ("completed", 4, 4)
    assert "0:00" in row(top.render(second), half)
    now[0] += top.KEEP_ENDED_S
    assert half not in {b.id for b in sampler.frame().batches}


def test_render_cuts_lines_to_the_terminal_width() -> None:
    frame = top.Frame(
        at=100.0,
        limits={"m": 4},
        models={"m": ModelOverview("m", in_flight=3, pending=7)},
        batches=[_progress("batch_x", done=1, total=3)],
        workers=2,
        model_rates={"m": 2.5},
        batch_rates={"batch_x": 0.5},
    )
    text = top.render(frame, width=40)
    assert all(len(x) <= 40 for x in text.splitlines())
    full = top.render(frame)
    assert row(full, "m")[:6] == ["m", "4", "3", "7", "0", "2.5"]
    assert row(full, "batch_x")[-2:] == ["0.5", "0:04"]  # 2 left at 0.5/s
    assert "workers alive: 2" in full


def _progress(batch_id: str, done: int, total: int) -> BatchProgress:
    from fusillade_celery.states import BatchStatus

    return BatchProgress(
        batch_id, BatchStatus.IN_PROGRESS, 0.0, 1e10, ("m",), total, done, 0, total - done, 0, 0
    )


class Terminal:
    """``fusillade-celery top`` on a pseudo-terminal of 120 x 40: what it drew so far."""

    def __init__(self, env: dict[str, str], cwd: Path, *args: str) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            [*CLI, "top", *args], env=env, cwd=cwd, stdin=slave, stdout=slave, stderr=slave
        )
        os.close(slave)
        self.seen = b""

    def read_until(self, done, timeout: float = 30.0) -> bytes:  # type: ignore[no-untyped-def]
        """Read what it draws until ``done(everything so far)``; fail after ``timeout``."""
        until = time.monotonic() + timeout
        while not done(self.seen):
            left = until - time.monotonic()
            assert left > 0, f"timed out; drawn so far: {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    break
        return self.seen

    def exit_code(self) -> int:
        """Its exit status, once it ended and everything it drew was read."""
        code = self.proc.wait(30)
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: nothing left once the child's side is closed
                break
            if not chunk:
                break
            self.seen += chunk
        os.close(self.master)
        return code


def frames(drawn: bytes) -> int:
    return drawn.count(top.HOME.encode() + top.TITLE.encode())


@pytest.mark.parametrize("stop", ["q", "ctrl-c"])
def test_live_view_redraws_in_a_terminal_and_quits_cleanly(
    scene, tmp_path: Path, stop: str
) -> None:  # type: ignore[no-untyped-def]
    _, env, half, _ = scene
    term = Terminal(env, tmp_path, "--interval", "0.2")
    try:
        drawn = term.read_until(lambda seen: frames(seen) >= 2)
        assert drawn.startswith(top.ENTER.encode())  # alternate screen
        last = drawn.rsplit(top.HOME.encode(), 1)[1].decode()
        assert half in last and "m1" in last
        assert all(len(x) <= 120 for x in re.split(r"\r?\n", last))
        if stop == "q":
            os.write(term.master, b"q")
        else:
            term.proc.send_signal(signal.SIGINT)
        assert term.exit_code() == 0
        assert term.seen.endswith(top.LEAVE.encode())  # the screen given back
        assert b"Traceback" not in term.seen
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait(10)
