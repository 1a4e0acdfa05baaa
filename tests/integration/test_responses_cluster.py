"""The ``/v1/responses`` loop on real processes (beat, a ``-P gevent`` worker, Redis,
PostgreSQL, the mock upstream; the mock tool server in this process): a loop with sibling
tool calls and an agent, a cancel that closes the in-flight tool calls, and ``kill -9`` of the
worker mid-loop: the chain resumes on another worker without repeating a finished step, and a
non-idempotent tool call that was in flight is not sent again."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fusillade_celery.testing.mock_tools import MockTools

from ..services import wait_for
from .conftest import Cluster, Processes, running_cluster

pytestmark = pytest.mark.integration

REDIS_DB = 15
MODEL = "rl"


@pytest.fixture(scope="module")
def loop_cluster(
    pg_admin: str, pg_template: str, redis_base: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Processes, MockTools]]:
    with MockTools() as tools:
        config = [
            {"name": "lookup", "url": tools.url_for("lookup"), "idempotent": True},
            {"name": "note", "url": tools.url_for("note")},
            {
                "name": "researcher",
                "kind": "agent",
                "model": MODEL,
                "tools": ["lookup"],
                "body": {"mock_tool_script": [[call("lookup", q="nested")]]},
            },
        ]
        with running_cluster(
            pg_admin,
            pg_template,
            redis_base,
            tmp_path_factory.mktemp("responses-cluster"),
            REDIS_DB,
            (MODEL,),
            {
                "FUSILLADE_TOOLS": json.dumps(config),
                "FUSILLADE_HEARTBEAT_INTERVAL_MS": "500",
                "FUSILLADE_STALE_WORKER_THRESHOLD_MS": "3000",
                "FUSILLADE_CLAIM_TIMEOUT_MS": "5000",
                "FUSILLADE_PROCESSING_TIMEOUT_MS": "60000",
                "FUSILLADE_CANCELLATION_POLL_INTERVAL_MS": "1000",
                "FUSILLADE_TIMEOUT_MS": "60000",
            },
            workers=1,
        ) as (c, procs):
            yield c, procs, tools


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def rline(custom_id: str, script: list[list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/responses",
        "body": {"model": MODEL, "input": custom_id, "mock_tool_script": script},
    }


def types(body: dict[str, Any]) -> list[str]:
    return [o["type"] for o in body["output"]]


def in_flight(tools: MockTools, **arguments: Any) -> list[dict[str, Any]]:
    """The tool calls with these arguments that have not ended."""
    return [
        e
        for e in tools.tools.log
        if "end" not in e and all(e["arguments"].get(k) == v for k, v in arguments.items())
    ]


def test_a_loop_with_sibling_calls_and_an_agent_on_a_gevent_worker(
    loop_cluster: tuple[Cluster, Processes, MockTools],
) -> None:
    c, _, tools = loop_cluster
    script = [
        [call("lookup", q="g-1"), call("note", text="g-2"), call("researcher", input="g-3")],
        [call("lookup", q="g-4")],
    ]
    batch_id = c.client.submit_batch([rline("g-loop", script)])
    assert c.wait_done(batch_id, 30)["status"] == "completed"
    (out,) = c.client.iter_results(batch_id)
    body = out["response"]["body"]
    assert types(body) == ["function_call"] * 3 + ["function_call_output"] * 3 + [
        "function_call",
        "function_call_output",
        "message",
    ]
    assert body["usage"]["total_tokens"] == 5 * 12  # three top-level calls, two of the agent
    calls = c.calls_for("g-loop")["g-loop"]
    assert [e["model"] for e in calls] == [MODEL] * 5
    assert all(
        e["headers"]["x-fusillade-request-id"] == calls[0]["headers"]["x-fusillade-request-id"]
        for e in calls
    )


def test_a_cancel_mid_loop_closes_the_in_flight_tool_calls(
    loop_cluster: tuple[Cluster, Processes, MockTools],
) -> None:
    c, _, tools = loop_cluster
    slow = [
        call("lookup", q="c-1", mock_latency_ms=30000),
        call("note", text="c-2", mock_latency_ms=30000),
    ]
    batch_id = c.client.submit_batch([rline("c-loop", [slow])])
    wait_for(
        lambda: len(in_flight(tools, q="c-1")) + len(in_flight(tools, text="c-2")) == 2,
        30,
        what="both sibling tool calls in flight",
    )
    cancelled_at = time.time()
    c.client.cancel_batch(batch_id)
    wait_for(
        lambda: not in_flight(tools, q="c-1") and not in_flight(tools, text="c-2"),
        10,
        what="the tool server to see both calls closed",
    )
    ends = [
        e
        for e in tools.tools.log
        if e["arguments"].get("q") == "c-1" or e["arguments"].get("text") == "c-2"
    ]
    assert [e["outcome"] for e in ends] == ["disconnected", "disconnected"]
    assert max(e["end"] for e in ends) - cancelled_at <= 1.0 + 2.0  # poll interval + 2 s
    assert c.wait_done(batch_id, 30)["status"] == "cancelled"
    assert [r["state"] for r in c.client.store.request_rows(batch_id)] == ["canceled"]
    assert len(c.calls_for("c-loop")["c-loop"]) == 1  # no model call after the cancel


def test_kill_9_mid_loop_resumes_without_repeating_steps_or_a_non_idempotent_call(
    loop_cluster: tuple[Cluster, Processes, MockTools],
) -> None:
    c, procs, tools = loop_cluster
    batch_id = c.client.submit_batch(
        [
            # A non-idempotent call done, then an idempotent one in flight at the kill.
            rline(
                "k-idem", [[call("note", text="k1")], [call("lookup", q="k2", mock_stall_ms=60000)]]
            ),
            # An idempotent call done, then a non-idempotent one in flight at the kill.
            rline(
                "k-once", [[call("lookup", q="k3")], [call("note", text="k4", mock_stall_ms=60000)]]
            ),
        ]
    )
    wait_for(
        lambda: in_flight(tools, q="k2") and in_flight(tools, text="k4"),
        30,
        what="the slow tool calls of both lines in flight",
    )
    procs.kill("w1", signal.SIGKILL)
    procs.start_worker("w2")
    assert c.wait_done(batch_id, 60)["status"] == "completed"
    rows = {r["custom_id"]: r for r in c.client.store.request_rows(batch_id)}

    assert rows["k-idem"]["state"] == "completed"
    body = json.loads(rows["k-idem"]["response_body"])
    assert types(body) == ["function_call", "function_call_output"] * 2 + ["message"]
    assert len(c.calls_for("k-idem")["k-idem"]) == 3  # each model call once: none repeated
    by_args = {}
    for e in tools.tools.log:
        by_args.setdefault(e["arguments"].get("q") or e["arguments"].get("text"), []).append(e)
    assert len(by_args["k1"]) == 1  # done before the kill: not repeated
    k2 = by_args["k2"]
    assert [e["outcome"] for e in k2] == ["disconnected", "ok"]  # idempotent: sent again
    assert k2[0]["call_id"] == k2[1]["call_id"]

    assert rows["k-once"]["state"] == "failed"
    assert json.loads(rows["k-once"]["error"])["kind"] == "step_abandoned"
    assert len(by_args["k3"]) == 1 and len(by_args["k4"]) == 1  # never sent twice
    assert len(c.calls_for("k-once")["k-once"]) == 2
