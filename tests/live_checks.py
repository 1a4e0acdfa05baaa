"""How a live limit change is seen from the upstream: the in-flight count the mock reports
moves to the new limit within a bound, and stays within it. Shared by the embedded run
(tests/test_live_limits.py) and the cluster (tests/integration/test_cluster.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .services import wait_for


@dataclass
class LimitChanges:
    """Figures of one down-and-up change, for the assertion messages and the note."""

    down_s: float = 0.0  # from ``limits set low`` to the upstream's last sight of more
    up_s: float = 0.0  # from ``limits set high`` to the upstream seeing high at once
    peak_while_low: int = 0
    #: (seconds since the command, in flight) of every change the upstream reported
    seen: list[tuple[float, int]] = field(default_factory=list)


def most_in_flight(
    in_flight: Callable[[], int],
    seconds: float,
    seen: list[tuple[float, int]],
    since: float,
    stop_at: int | None = None,
) -> int:
    """The most requests in flight at the upstream over ``seconds`` (sampled every 10 ms, each
    change noted in ``seen``), or until ``stop_at`` is seen: an observation window."""
    peak, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        n = in_flight()
        if not seen or seen[-1][1] != n:
            seen.append((round(time.monotonic() - since, 3), n))
        peak = max(peak, n)
        if stop_at is not None and n >= stop_at:
            break
        time.sleep(0.01)
    return peak


def settled_at_most(
    in_flight: Callable[[], int],
    most: int,
    settle_s: float,
    timeout: float,
    since: float,
    seen: list[tuple[float, int]],
) -> float:
    """Wait until the upstream has seen at most ``most`` in flight for ``settle_s`` on end,
    and return when (monotonic) it last saw more. A single low sample proves nothing: calls
    started together end together, so the count dips between waves whatever the limit."""
    # From now, not ``since``: the command's own run is not an observation.
    last_above = time.monotonic()
    deadline = last_above + timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        n = in_flight()
        if not seen or seen[-1][1] != n:
            seen.append((round(now - since, 3), n))
        if n > most:
            last_above = now
        elif now - last_above >= settle_s:
            return last_above
        time.sleep(0.01)
    raise AssertionError(f"in flight did not settle at {most} or fewer within {timeout}s")


def change_down_and_up(
    set_limit: Callable[[int], None],
    in_flight: Callable[[], int],
    low: int,
    high: int,
    bound_s: float,
    latency_s: float,
    watch_s: float = 1.5,
) -> LimitChanges:
    """With the model running at ``high``: set ``low``; wait until the upstream has seen at
    most ``low`` in flight for two request latencies (the drain must end within ``bound_s``
    of the command), then watch that it stays there for ``watch_s``; set ``high`` again and
    wait (at most ``bound_s``) until it sees ``high`` in flight."""
    out = LimitChanges()
    wait_for(lambda: in_flight() == high, 30, 0.01, f"{high} requests in flight at first")
    start = time.monotonic()
    set_limit(low)
    last_above = settled_at_most(
        in_flight, low, 2 * latency_s, bound_s + 2 * latency_s, start, out.seen
    )
    out.down_s = last_above - start
    assert out.down_s <= bound_s, f"drained to {low} only after {out.down_s:.2f}s"
    out.peak_while_low = most_in_flight(in_flight, watch_s, out.seen, start)
    start = time.monotonic()
    set_limit(high)
    up: list[tuple[float, int]] = []
    most_in_flight(in_flight, bound_s, up, start, stop_at=high)
    assert up and up[-1][1] >= high, f"in flight did not fill to {high}: {up}"
    out.up_s = up[-1][0]
    return out
