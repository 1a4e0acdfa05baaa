"""Slot-release refills: never block the caller; requests arriving while a claim runs fold into
exactly one more claim; a failing claim neither wedges the model nor reaches the caller."""

from __future__ import annotations

import threading

from fusillade_celery.claimer import Refill
from tests.services import wait_for


def test_requests_during_a_claim_fold_into_one_more_claim_and_never_block() -> None:
    refill = Refill()
    entered = threading.Event()
    release = threading.Event()
    runs: list[str] = []

    def slow_claim() -> None:
        runs.append("run")
        if len(runs) == 1:
            entered.set()
            assert release.wait(5)

    refill.request("m", slow_claim)  # returns at once; the claim runs in the background
    assert entered.wait(5)
    for _ in range(5):  # five slot releases while the first claim still runs
        refill.request("m", slow_claim)
    assert runs == ["run"]
    release.set()
    wait_for(refill.idle, 5, what="the refill runner to finish")
    assert runs == ["run", "run"]  # one follow-up covers all five
    refill.request("m", slow_claim)
    wait_for(refill.idle, 5, what="the refill runner to finish")
    assert runs == ["run", "run", "run"]  # idle again: a new request claims again


def test_models_do_not_wait_for_each_other() -> None:
    refill = Refill()
    release = threading.Event()
    entered = threading.Event()
    ran = threading.Event()

    def block() -> None:
        entered.set()
        assert release.wait(5)

    refill.request("a", block)
    assert entered.wait(5)
    refill.request("b", ran.set)
    assert ran.wait(5)  # model b claimed while model a's claim is still blocked
    release.set()
    wait_for(refill.idle, 5, what="the refill runners to finish")


def test_a_failing_claim_neither_wedges_the_model_nor_reaches_the_caller() -> None:
    refill = Refill()

    def boom() -> None:
        raise RuntimeError("database down")

    refill.request("m", boom)  # no exception here: the write-back path must not fail
    wait_for(refill.idle, 5, what="the failed refill to finish")
    ran = threading.Event()
    refill.request("m", ran.set)
    assert ran.wait(5)
