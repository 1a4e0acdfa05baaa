"""Execute messages are sized to the queue's consumers: never more requests than the smallest
advertised -c, as few messages as that allows, and small when nobody says what it can run."""

from __future__ import annotations

import time

from fusillade_celery.claimer import UNKNOWN_CONCURRENCY_CAP, MessageSizer, split
from fusillade_celery.settings import Settings
from fusillade_celery.store import Store


def test_split_keeps_every_id_once_in_order_in_near_equal_messages() -> None:
    ids = list(range(1000))
    parts = split(ids, 64)
    assert [i for p in parts for i in p] == ids
    assert len(parts) == 16 and max(map(len, parts)) <= 64
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_split_sends_a_small_claim_as_one_message() -> None:
    assert [len(p) for p in split(list(range(40)), 64)] == [40]
    assert [len(p) for p in split(list(range(65)), 64)] == [33, 32]
    assert split([], 64) == []


def test_sizer_caps_messages_at_the_smallest_live_consumer(
    store: Store, settings: Settings
) -> None:
    settings = settings.replace(requests_per_message=64, heartbeat_interval_ms=0)
    now = time.time()
    sizer = MessageSizer()
    ids = list(range(100))
    # Nobody has registered yet: small messages, whatever the workers turn out to be.
    cap = UNKNOWN_CONCURRENCY_CAP
    assert [len(p) for p in sizer.split(store, settings, "model.m1", ids[: 2 * cap])] == [cap, cap]
    store.heartbeat("h:1", "h", 1, "fusillade.control,model.m1", now, concurrency=100)
    store.heartbeat("h:2", "h", 2, "fusillade.control,model.m1", now, concurrency=20)
    store.heartbeat("h:3", "h", 3, "model.other", now, concurrency=4)  # another queue
    store.heartbeat("h:4", "h", 4, "model.m1", now - 3600, concurrency=2)  # stale
    store.heartbeat("h:5", "h", 5, "model.m1", now, concurrency=3)
    store.mark_worker_dead("h:5", now)  # stopped
    parts = sizer.split(store, settings, "model.m1", ids)
    assert [len(p) for p in parts] == [20] * 5
    assert [len(p) for p in sizer.split(store, settings, "model.m1", ids[:30])] == [15, 15]
    # The setting still caps a consumer with a large -c.
    assert [
        len(p)
        for p in sizer.split(store, settings.replace(requests_per_message=8), "model.m1", ids[:16])
    ] == [8, 8]
    # A consumer that does not advertise its -c (an older worker) makes messages small again.
    store.heartbeat("h:6", "h", 6, "model.m1", now, concurrency=None)
    assert [len(p) for p in sizer.split(store, settings, "model.m1", ids[: 6 * cap])] == [cap] * 6


def test_sizer_reads_the_consumers_once_per_ttl(store: Store, settings: Settings) -> None:
    sizer = MessageSizer()
    hourly = settings.replace(heartbeat_interval_ms=3_600_000)
    store.heartbeat("h:1", "h", 1, "model.m1", time.time(), concurrency=10)
    assert sizer.consumers(store, hourly, "model.m1") == [10]
    store.heartbeat("h:2", "h", 2, "model.m1", time.time(), concurrency=30)
    assert sizer.consumers(store, hourly, "model.m1") == [10]  # cached
    fresh = settings.replace(heartbeat_interval_ms=0)
    assert MessageSizer().consumers(store, fresh, "model.m1") in ([10, 30], [30, 10])
