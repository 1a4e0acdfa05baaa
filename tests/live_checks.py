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

    down_s: float = 0.0  # from ``limits set low`` to the upstream seeing at most low
    up_s: float = 0.0  # from ``limits set high`` to the upstream seeing high at once
    peak_while_low: int = 0
    seen: list[int] = field(default_factory=list)


def most_in_flight(in_flight: Callable[[], int], seconds: float) -> int:
    """The most requests in flight at the upstream over ``seconds`` (sampled every 10 ms):
    an observation window, not a wait for something to happen."""
    peak, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, in_flight())
        time.sleep(0.01)
    return peak


def change_down_and_up(
    set_limit: Callable[[int], None],
    in_flight: Callable[[], int],
    low: int,
    high: int,
    bound_s: float,
    watch_s: float = 1.5,
) -> LimitChanges:
    """With the model running at ``high``: set ``low``, wait (at most ``bound_s``) until the
    upstream sees at most ``low`` in flight, watch that it stays there for ``watch_s``; set
    ``high`` again and wait (at most ``bound_s``) until it sees ``high`` in flight."""
    out = LimitChanges()
    wait_for(lambda: in_flight() == high, 30, 0.01, f"{high} requests in flight at first")
    start = time.monotonic()
    set_limit(low)
    wait_for(lambda: in_flight() <= low, bound_s, 0.01, f"in flight to drain to {low}")
    out.down_s = time.monotonic() - start
    out.peak_while_low = most_in_flight(in_flight, watch_s)
    start = time.monotonic()
    set_limit(high)
    wait_for(lambda: in_flight() >= high, bound_s, 0.01, f"in flight to fill to {high}")
    out.up_s = time.monotonic() - start
    return out
