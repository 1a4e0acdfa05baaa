"""Running it live on real processes (beat + two workers + the mock): a limit changed with
``fusillade-celery limits set`` while a batch runs is what the upstream sees within two claim
intervals, down and up, with nothing restarted and no request lost."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from fusillade_celery import limits, live

from ..conftest import line
from ..live_checks import change_down_and_up
from .conftest import Cluster

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "fusillade_celery.cli"]
LATENCY_S = 0.3


def test_limits_set_down_and_up_while_a_batch_runs(cluster: Cluster) -> None:
    limits.set_limits({"live": 8}, cluster.client)
    batch_id = cluster.client.submit_batch(
        [line(f"live-{i}", model="live", mock_latency_ms=int(LATENCY_S * 1000)) for i in range(300)]
    )

    def set_limit(n: int) -> None:
        done = subprocess.run(
            [*CLI, "limits", "set", f"live={n}"],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr

    def in_flight() -> int:
        stats = requests.get(cluster.mock_url + "/_mock/stats?log=0", timeout=5).json()
        return int(stats["in_flight"].get("live", 0))

    interval_s = cluster.settings.claim_interval_ms / 1000.0
    try:
        seen = change_down_and_up(
            set_limit,
            in_flight,
            low=3,
            high=8,
            latency_s=LATENCY_S,
            # two claim intervals, the cache, one request's latency (in flight drains as
            # calls end; nothing is killed), the command's own start-up (about 1 s), slack
            bound_s=2 * interval_s + live.CACHE_MAX_S + LATENCY_S + 1.0 + 3.0,
        )
        assert seen.peak_while_low <= 3, seen
        batch = cluster.wait_done(batch_id, 120)
    finally:
        limits.unset_limits(["live"], cluster.client)
    assert batch["request_counts"] == {"total": 300, "completed": 300, "failed": 0}
    assert cluster.mock_stats()["peak_concurrency"]["live"] == 8
    print(f"cluster: drained to 3 in {seen.down_s:.2f}s, filled to 8 in {seen.up_s:.2f}s")
