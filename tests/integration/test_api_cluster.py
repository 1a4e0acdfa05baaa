"""``serve`` in the distributed mode: two stateless replicas in front of PostgreSQL, Redis, beat
and a ``celery worker`` process; what one replica takes, the other serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from ..api_server import jsonl, make_key, serving
from ..conftest import line
from ..services import wait_for
from .conftest import running_cluster

pytestmark = pytest.mark.integration
REDIS_DB = 2


def test_two_replicas_serve_one_cluster(
    pg_admin: str, pg_template: str, redis_base: str, tmp_path: Path
) -> None:
    with running_cluster(
        pg_admin,
        pg_template,
        redis_base,
        tmp_path,
        REDIS_DB,
        ("apic",),
        {"FUSILLADE_MODEL_LIMITS": "apic=4"},
        workers=1,
    ) as (cluster, _):
        env = dict(cluster.env)
        key = make_key(env, "cluster-team")
        with (
            serving(env, tmp_path / "a.log") as a,
            serving(env, tmp_path / "b.log") as b,
        ):
            for replica in (a, b):
                health = requests.get(replica.url + "/healthz", timeout=10).json()
                assert health == {"status": "ok", "database": "ok", "broker": "ok"}
            lines = [line(f"ac{i}", model="apic") for i in range(40)]
            lines.append(line("ac-flaky", model="apic", mock_statuses=[503, 200]))
            f = a.sdk(key).files.create(file=("c.jsonl", jsonl(lines)), purpose="batch")
            batch = a.sdk(key).batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h"
            )
            reader = b.sdk(key)
            done = wait_for(
                lambda: (x := reader.batches.retrieve(batch.id)).status == "completed" and x,
                60,
                what="the batch to complete",
            )
            assert done.request_counts is not None and done.request_counts.completed == 41
            out = reader.files.content(done.output_file_id or "").text.splitlines()
            assert [json.loads(x) for x in out] == list(cluster.client.iter_results(batch.id))
            assert [x.id for x in reader.batches.list()] == [batch.id]
            assert "Traceback" not in a.logs() + b.logs()
