"""Streaming and a custom processor on real processes (beat, a ``-P gevent`` worker, Redis,
PostgreSQL, the mock): streamed replies land in the output as JSON, a broken stream is
retried, the processor named by ``FUSILLADE_PROCESSORS`` is loaded by the worker and handles
its path, and a cancel closes a stream that has gone silent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fusillade_celery.submit import Client

from ..conftest import line
from ..services import wait_for
from .conftest import Cluster, running_cluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
REDIS_DB = 14


@pytest.fixture(scope="module")
def cluster(
    pg_admin: str, pg_template: str, redis_base: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with running_cluster(
        pg_admin,
        pg_template,
        redis_base,
        tmp_path_factory.mktemp("stream-cluster"),
        REDIS_DB,
        ("m1",),
        {
            "FUSILLADE_STREAM_ENDPOINTS": "/v1/chat/completions",
            "FUSILLADE_STREAM_IDLE_TIMEOUT_MS": "500",
            "FUSILLADE_PROCESSORS": "/v1/annotated=tests.custom_processor:factory",
            "PYTHONPATH": str(ROOT),  # the workers import tests.custom_processor
        },
        workers=1,
    ) as (c, _):
        yield c


def test_streamed_requests_and_a_custom_processor_on_a_worker(cluster: Cluster) -> None:
    client: Client = cluster.client
    streamed = client.submit_batch(
        [
            line("st-a", n=2),
            line("st-b", mock_stream_truncate=True),  # retried, then complete
            line("st-c", mock_stream_stall_ms=3000),  # idle timeout, retried
        ]
    )
    annotated = client.submit_batch([line("an-a", url="/v1/annotated")])
    assert cluster.wait_done(streamed, 30)["request_counts"]["completed"] == 3
    assert cluster.wait_done(annotated, 30)["status"] == "completed"
    out = {o["custom_id"]: o["response"]["body"] for o in client.iter_results(streamed)}
    assert [c["message"]["content"] for c in out["st-a"]["choices"]] == [
        "reply to st-a (call 1)",
        "reply to st-a (call 1) [1]",
    ]
    assert out["st-a"]["usage"]["total_tokens"] == 12
    assert out["st-b"]["choices"][0]["message"]["content"] == "reply to st-b (call 2)"
    assert out["st-c"]["choices"][0]["message"]["content"] == "reply to st-c (call 2)"
    calls = cluster.calls_for("st-")
    assert all(c.get("stream") for cs in calls.values() for c in cs)
    (an,) = client.iter_results(annotated)
    assert an["response"]["body"]["processed_by"] == "annotating"
    assert cluster.calls_for("an-")["an-a"][0]["path"] == "/v1/annotated"


def test_a_cancel_closes_a_silent_stream_on_a_worker(cluster: Cluster) -> None:
    """The stream sends its first event and then nothing for 20 s (its idle timeout is
    raised above that): only the worker killing the call can end it."""
    client = Client(cluster.settings)
    batch_id = client.submit_batch(
        [line("cx-a", mock_stream_stall_ms=20_000, mock_stream_keepalive_ms=10_000)]
    )
    wait_for(lambda: "cx-a" in cluster.calls_for("cx-"), 15, what="the streamed call")
    client.cancel_batch(batch_id)
    call = wait_for(
        lambda: (c := cluster.calls_for("cx-")["cx-a"][0]).get("end") and c,
        5,
        what="the mock to see the stream closed",
    )
    assert call["outcome"] == "disconnected"
    assert call["end"] - call["start"] < 5
    assert cluster.wait_done(batch_id, 15)["status"] == "cancelled"
