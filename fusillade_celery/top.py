"""``fusillade-celery top``: the engine live in a terminal, redrawn every second (like htop or
``celery events``). Per model: its limit, requests in flight, pending and retrying, requests
finished per second and its last upstream failure; per running batch: a progress bar, counts
and an ETA. ``--once`` prints one frame (scripts, tests).

Each frame costs the index-only counts of ``Store.model_overview`` and
``Store.batch_progress``; rates are differences between frames, so no query looks at
finished rows."""

from __future__ import annotations

import argparse
import os
import select
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import Settings
    from .store import BatchProgress, ModelOverview, Store

#: Rates are measured over the frames of this many seconds.
RATE_WINDOW_S = 10.0
#: A batch that ended stays on screen this long, with its final counts.
KEEP_ENDED_S = 10.0
BAR_WIDTH = 20
#: ANSI: alternate screen and hidden cursor on entry, both restored on exit; clear + home.
ENTER, LEAVE, HOME = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l", "\x1b[H\x1b[2J"
TITLE = "fusillade-celery top"


def register(sub: Any) -> None:
    """Add ``top`` to the CLI's subcommands (``cli.build_parser``)."""
    p = sub.add_parser("top", help="live view of models and running batches (q quits)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between frames (default 1)")
    p.add_argument("--batches", type=int, default=20, help="most batches shown (default 20)")
    p.set_defaults(func=cmd_top)


@dataclass(frozen=True)
class Frame:
    """What one redraw shows."""

    at: float
    limits: Mapping[str, int]
    models: Mapping[str, ModelOverview]
    batches: list[BatchProgress]
    workers: int
    model_rates: Mapping[str, float]
    batch_rates: Mapping[str, float]


class Rates:
    """Per key, the growth of a running total per second over the last ``window_s``
    seconds of samples (None until a key has an earlier sample)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, float]]] = deque()

    def add(self, at: float, totals: dict[str, float]) -> dict[str, float | None]:
        while len(self._samples) >= 2 and self._samples[1][0] <= at - self.window_s:
            self._samples.popleft()
        rates: dict[str, float | None] = {}
        for key, value in totals.items():
            earlier = next(((t, s[key]) for t, s in self._samples if key in s and t < at), None)
            rates[key] = None if earlier is None else (value - earlier[1]) / (at - earlier[0])
        self._samples.append((at, totals))
        return rates


@dataclass
class Sampler:
    """Reads a frame; keeps what rates and just-ended batches need between frames."""

    store: Store
    settings: Settings
    max_batches: int = 20
    clock: Callable[[], float] = time.time
    _batch_rates: Rates = field(default_factory=Rates)
    _model_rates: Rates = field(default_factory=Rates)
    _done: dict[str, int] = field(default_factory=dict)  # batch -> done at the last frame
    _model_done: dict[str, float] = field(default_factory=dict)  # model -> attributed done
    _ended: dict[str, float] = field(default_factory=dict)  # batch -> when first seen ended

    def frame(self) -> Frame:
        from . import live
        from .states import TERMINAL_BATCH
        from .store import ModelOverview

        now = self.clock()
        models = {o.model: o for o in self.store.model_overview(now)}
        self._ended = {b: t for b, t in self._ended.items() if now - t < KEEP_ENDED_S}
        batches = self.store.batch_progress([*self._done, *self._ended], self.max_batches)
        for b in batches:
            if b.status in TERMINAL_BATCH:
                self._ended.setdefault(b.id, now)
        batches = [b for b in batches if now - self._ended.get(b.id, now) < KEEP_ENDED_S]
        self._attribute(batches, models)
        batch_rates = self._batch_rates.add(now, {b.id: float(b.done) for b in batches})
        model_rates = self._model_rates.add(now, dict(self._model_done))
        names = sorted(set(models) | {m for b in batches for m in b.models})
        config = live.current(self.store, self.settings)
        alive_after = now - self.settings.stale_worker_threshold_ms / 1000.0
        workers = sum(
            1
            for w in self.store.worker_rows()
            if w["status"] == "alive" and w["last_heartbeat"] >= alive_after
        )
        return Frame(
            at=now,
            limits={m: config.limit_for(m) for m in names},
            models={m: models.get(m) or ModelOverview(m) for m in names},
            batches=batches,
            workers=workers,
            model_rates={m: r for m, r in model_rates.items() if r is not None},
            batch_rates={b: r for b, r in batch_rates.items() if r is not None},
        )

    def _attribute(self, batches: list[BatchProgress], models: Mapping[str, ModelOverview]) -> None:
        """Credit each batch's requests finished since the last frame to its models: all to
        the one model of a one-model batch; else shared by the models' requests in flight."""
        done = {}
        for b in batches:
            delta = b.done - self._done.get(b.id, b.done)
            done[b.id] = b.done
            if delta <= 0:
                continue
            busy = {m: (models[m].in_flight if m in models else 0) for m in b.models}
            total = sum(busy.values())
            for m in b.models:
                share = busy[m] / total if total else 1 / len(b.models)
                self._model_done[m] = self._model_done.get(m, 0.0) + delta * share
        for m in {m for b in batches for m in b.models}:
            self._model_done.setdefault(m, 0.0)
        self._done = {i: n for i, n in done.items() if i not in self._ended}


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = width if total <= 0 else min(width, width * done // total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{max(rate, 0.0):.1f}"


def render(frame: Frame, width: int | None = None) -> str:
    """The frame as text; lines cut at ``width`` when given (a terminal's)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(frame.at))
    lines = [f"{TITLE}   {stamp} UTC   workers alive: {frame.workers}   (q quits)", ""]
    head: tuple[str, ...] = ("MODEL", "LIMIT", "IN FLIGHT", "PENDING", "RETRYING", "REQ/S")
    head += ("LAST ERROR",)
    rows = _model_rows(frame) or [("(no models with work)", *[""] * 6)]
    lines += _table(head, rows, right={1, 2, 3, 4, 5})
    lines.append("")
    head = ("BATCH", "STATUS", "PROGRESS", "DONE/TOTAL", "FAILED", "RETRYING", "REQ/S", "ETA")
    rows = _batch_rows(frame) or [("(no running batches)", *[""] * 7)]
    lines += _table(head, rows, right={3, 4, 5, 6, 7})
    if width:
        lines = [line[:width] for line in lines]
    return "\n".join(lines) + "\n"


def _model_rows(frame: Frame) -> list[tuple[str, ...]]:
    from .follow import ago

    rows: list[tuple[str, ...]] = []
    for m, o in frame.models.items():
        err = o.last_error
        last = "-"
        if err is not None:
            status = f" {err.status_code}" if err.status_code is not None else ""
            host = err.host or "(no upstream)"
            last = f"{err.kind}{status} at {host}, {ago(frame.at - err.at)} ago: {err.message}"
        limit = str(frame.limits.get(m, ""))
        counts = (str(o.in_flight), str(o.pending), str(o.retrying))
        rows.append((m, limit, *counts, _rate(frame.model_rates.get(m)), last))
    return rows


def _batch_rows(frame: Frame) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for b in frame.batches:
        rate = frame.batch_rates.get(b.id)
        left = b.total - b.done
        eta = 0.0 if left <= 0 else (left / rate if rate and rate > 0 else None)
        pct = 100 * b.done // b.total if b.total else 100
        progress = f"{bar(b.done, b.total)} {pct:3d}%"
        counts = (f"{b.done}/{b.total}", str(b.failed), str(b.retrying))
        rows.append((b.id, b.status.value, progress, *counts, _rate(rate), _eta(eta)))
    return rows


def _table(head: tuple[str, ...], rows: Iterable[tuple[str, ...]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell (those in ``right`` aligned right); the last
    column is not padded (a long error message is cut by the terminal's width only)."""
    rows = list(rows)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]

    def fmt(r: tuple[str, ...]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=False))
        ]
        return "  ".join([*cells, r[-1]]).rstrip()

    return [fmt(head), *map(fmt, rows)]


@contextmanager
def _keys(stream: IO[str]) -> Iterator[Any]:
    """Keys pressed without Enter (cbreak mode) while the view runs, the terminal restored
    after; yields a ``wait(seconds) -> quit?`` function. Not a terminal: it just sleeps."""
    if not stream.isatty():

        def sleep(seconds: float) -> bool:
            time.sleep(seconds)
            return False

        yield sleep
        return
    import termios
    import tty

    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait(seconds: float) -> bool:
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if ready and os.read(fd, 1) in (b"q", b"Q"):
                return True
        return False

    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run(sampler: Sampler, interval: float, out: IO[str], keys: IO[str]) -> int:
    """Redraw every ``interval`` until q or Ctrl-C (exit 0). On a terminal each frame
    replaces the last on the alternate screen; otherwise frames follow each other."""
    from sqlalchemy.exc import DBAPIError

    tty = out.isatty()
    try:
        with _keys(keys) as wait:
            if tty:
                out.write(ENTER)
            try:
                while True:
                    width = shutil.get_terminal_size().columns if tty else None
                    try:
                        text = render(sampler.frame(), width)
                    except DBAPIError as exc:  # a restart or failover: keep watching
                        first = str(exc.orig).strip().splitlines()[0] if exc.orig else exc
                        text = f"{TITLE}   database unreachable: {first}\n"
                    out.write(HOME + text if tty else text + "\n")
                    out.flush()
                    if wait(interval):
                        return 0
            finally:
                if tty:
                    out.write(LEAVE)
                    out.flush()
    except KeyboardInterrupt:
        return 0


def cmd_top(args: argparse.Namespace) -> int:
    from .cli import _client, _settings

    settings = _settings()
    sampler = Sampler(_client(settings).store, settings, max(args.batches, 1))
    if args.once:
        sys.stdout.write(render(sampler.frame()))
        sys.stdout.flush()
        return 0
    return run(sampler, max(args.interval, 0.05), sys.stdout, sys.stdin)
