"""Slot-release refills: requests arriving while a claim runs fold into exactly one more run."""

from __future__ import annotations

import threading

import pytest

from fusillade_celery.claimer import Refill


def test_requests_during_a_run_fold_into_one_more_run() -> None:
    refill = Refill()
    entered = threading.Event()
    release = threading.Event()
    runs: list[str] = []

    def slow_claim() -> None:
        runs.append("run")
        if len(runs) == 1:
            entered.set()
            assert release.wait(5)

    first = threading.Thread(target=refill.request, args=("m", slow_claim))
    first.start()
    assert entered.wait(5)
    # Five slot releases while the first claim is still running: none of them blocks or runs.
    for _ in range(5):
        refill.request("m", slow_claim)
    assert runs == ["run"]
    release.set()
    first.join(5)
    assert runs == ["run", "run"]  # one follow-up covers all five
    refill.request("m", slow_claim)
    assert runs == ["run", "run", "run"]  # idle again: a new request runs at once


def test_models_do_not_wait_for_each_other() -> None:
    refill = Refill()
    release = threading.Event()
    entered = threading.Event()
    ran: list[str] = []

    def block() -> None:
        entered.set()
        assert release.wait(5)

    t = threading.Thread(target=refill.request, args=("a", block))
    t.start()
    assert entered.wait(5)
    refill.request("b", lambda: ran.append("b"))
    assert ran == ["b"]
    release.set()
    t.join(5)


def test_a_failing_claim_does_not_wedge_the_model() -> None:
    refill = Refill()

    def boom() -> None:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError):
        refill.request("m", boom)
    ran: list[int] = []
    refill.request("m", lambda: ran.append(1))
    assert ran == [1]
