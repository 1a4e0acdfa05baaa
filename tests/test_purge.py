"""Soft delete and the chunked, throttled purge (right to erasure), on PostgreSQL."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from fusillade_celery import maintenance, schema
from fusillade_celery.settings import Settings
from fusillade_celery.store import NotFound
from fusillade_celery.submit import Client

from .conftest import line


@pytest.fixture
def pg_client(pg_url: str) -> Client:
    return Client(Settings().replace(database_url=pg_url, upstream_url="http://127.0.0.1:9"))


def count(client: Client, table: object, where: object = None) -> int:
    stmt = select(func.count()).select_from(table)  # type: ignore[arg-type]
    if where is not None:
        stmt = stmt.where(where)  # type: ignore[arg-type]
    with client.store.engine.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


def test_purge_erases_orphans_in_throttled_chunks(pg_client: Client) -> None:
    doomed = pg_client.submit_batch([line(f"d{i}", content="secret") for i in range(5000)])
    live = pg_client.submit_batch([line(f"l{i}") for i in range(50)])
    doomed_file = pg_client.get_batch(doomed)["input_file_id"]
    live_before = pg_client.store.request_rows(live)

    pg_client.delete_batch(doomed)
    pg_client.delete_file(doomed_file)
    with pytest.raises(NotFound):
        pg_client.get_batch(doomed)
    with pytest.raises(NotFound):
        list(pg_client.iter_results(doomed))
    with pytest.raises(NotFound):
        list(pg_client.iter_file(doomed_file))
    with pytest.raises(NotFound):
        pg_client.delete_batch(doomed)

    settings = pg_client.settings.replace(purge_batch_size=1000, purge_throttle_ms=50)
    pauses: list[float] = []
    chunks = maintenance.purge(
        pg_client.store, settings, sleep=lambda s: (pauses.append(s), time.sleep(s))
    )
    assert [n for _, n in chunks] == [1000] * 10  # 5,000 requests, then 5,000 templates
    assert pauses == [0.05] * 10
    gaps = [b[0] - a[0] for a, b in zip(chunks, chunks[1:], strict=False)]
    assert min(gaps) >= 0.05
    rq, rt = schema.requests, schema.request_templates
    assert count(pg_client, rq, rq.c.batch_id == doomed) == 0
    assert count(pg_client, rt, rt.c.file_id == doomed_file) == 0
    assert pg_client.store.request_rows(live) == live_before
    assert pg_client.get_batch(live)["request_counts"]["total"] == 50
    assert maintenance.purge(pg_client.store, settings) == []


def test_deleting_a_running_batch_cancels_its_requests(pg_client: Client) -> None:
    batch_id = pg_client.submit_batch([line("a"), line("b")])
    pg_client.delete_batch(batch_id)
    assert {r["state"] for r in pg_client.store.request_rows(batch_id)} == {"canceled"}
    assert pg_client.store.active_models() == set()


def test_a_deleted_file_keeps_its_templates_while_a_batch_made_from_it_has_requests(
    pg_client: Client,
) -> None:
    batch_id = pg_client.submit_batch([line(f"k{i}") for i in range(30)])
    file_id = pg_client.get_batch(batch_id)["input_file_id"]
    other = pg_client.submit_batch([line(f"o{i}") for i in range(20)])
    other_file = pg_client.get_batch(other)["input_file_id"]
    pg_client.delete_file(file_id)
    pg_client.delete_file(other_file)
    pg_client.delete_batch(other)
    settings = pg_client.settings.replace(purge_batch_size=1000, purge_throttle_ms=0)

    # The other file's batch is gone: its 20 requests, then its 20 templates, go; the kept
    # batch's requests still run from its file's templates.
    assert [n for _, n in maintenance.purge(pg_client.store, settings)] == [20, 20]
    rt = schema.request_templates
    assert count(pg_client, rt, rt.c.file_id == file_id) == 30
    assert count(pg_client, rt, rt.c.file_id == other_file) == 0
    token, claimed = pg_client.store.claim("m1", "m1", 100, 100, time.time())
    started = pg_client.store.start([c.id for c in claimed], token, "w", time.time())
    assert sorted(i.custom_id for i in started) == sorted(f"k{i}" for i in range(30))

    pg_client.delete_batch(batch_id)
    assert [n for _, n in maintenance.purge(pg_client.store, settings)] == [30, 30]
    assert count(pg_client, rt, rt.c.file_id == file_id) == 0
