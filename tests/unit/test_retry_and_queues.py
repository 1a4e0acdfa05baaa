"""Pure policy pieces: backoff, retry denial, queue names, the beat schedule."""

from __future__ import annotations

import pytest

from fusillade_celery.queues import CONTROL_QUEUE, model_for_queue, queue_for_model
from fusillade_celery.retry import backoff_s, expiry_grace_s, retry_delay
from fusillade_celery.schedule import beat_schedule
from fusillade_celery.settings import Settings

S = Settings().replace(backoff_ms=1000, backoff_factor=2, max_backoff_ms=10000, max_retries=5)


@pytest.mark.parametrize(
    ("attempt", "expected"), [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (9, 10.0)]
)
def test_backoff_follows_the_formula_and_is_capped(attempt: int, expected: float) -> None:
    assert backoff_s(attempt, S) == expected


def test_backoff_is_the_cap_where_the_power_overflows_a_float() -> None:
    """3.0 ** 647 overflows: with the default 1,000 retries a request that is retried for
    long enough reaches it, and its message must still get a delay, not crash."""
    many = S.replace(backoff_factor=3.0, max_retries=5000)
    assert backoff_s(647, many) == 10.0
    assert retry_delay(4999, 0, 1e9, many) == 10.0


def test_retry_denied_when_budget_spent() -> None:
    assert retry_delay(4, 0, 1e9, S) == 10.0
    assert retry_delay(5, 0, 1e9, S) is None


def test_retry_denied_at_or_after_the_deadline() -> None:
    # now=100, delay 1 s: due at 101
    assert retry_delay(0, 100, 101.5, S) == 1.0
    assert retry_delay(0, 100, 101.0, S) is None  # exactly at the deadline: denied
    stop_early = S.replace(stop_before_deadline_ms=1000)
    assert retry_delay(0, 100, 101.5, stop_early) is None
    grace = S.replace(stop_before_deadline_ms=-5000)  # retry past the deadline by 5 s
    assert retry_delay(0, 100, 100.5, grace) == 1.0
    assert expiry_grace_s(grace) == 5.0 and expiry_grace_s(S) == 0.0


def test_queue_names() -> None:
    assert queue_for_model("gpt-4") == "model.gpt-4"
    assert model_for_queue("model.gpt-4") == "gpt-4"
    assert model_for_queue(CONTROL_QUEUE) is None
    with pytest.raises(ValueError):
        queue_for_model("")


def test_beat_schedule_has_every_periodic_task_with_expiry() -> None:
    sched = beat_schedule(Settings().replace(claim_interval_ms=500, claim_timeout_ms=8000))
    assert {e["task"] for e in sched.values()} == {
        "fusillade.claim",
        "fusillade.finalize",
        "fusillade.reap",
        "fusillade.purge",
    }
    assert sched["fusillade-claim"]["schedule"] == 0.5
    assert sched["fusillade-reap"]["schedule"] == 2.0
    assert sched["fusillade-purge"]["schedule"] == 600.0
    assert "fusillade-purge" not in beat_schedule(Settings().replace(purge_interval_ms=0))
    for entry in sched.values():
        assert entry["options"]["queue"] == CONTROL_QUEUE
        assert entry["options"]["expires"] >= entry["schedule"]
