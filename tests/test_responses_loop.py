"""The ``/v1/responses`` loop through the real execute path (claim, start, fenced write-back,
retries) against the mock upstream and the mock tool server, in process: the three-step loop,
caller-side tools, agents, caps, tool failures, resume after an interrupted step, streaming,
purge. Worker death and cancel with real processes: ``integration/test_responses_cluster``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fusillade_celery import claimer, maintenance
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.processors import responses_loop
from fusillade_celery.settings import Settings
from fusillade_celery.submit import Client
from fusillade_celery.testing.mock_tools import ERROR_BODY_MARK, MockTools
from fusillade_celery.toolconfig import parse_tools

from .test_execute import Recorder, run_claimed, run_message


@pytest.fixture
def db_url(pg_url: str) -> str:
    """PostgreSQL; the first test also runs on SQLite (``loop_db``)."""
    return pg_url


@pytest.fixture
def tool_server() -> Iterator[MockTools]:
    with MockTools() as server:
        yield server


def tools_config(url: str) -> Any:
    """lookup (idempotent), note (not), researcher (an agent using lookup), looper (an agent
    that always calls itself)."""
    return parse_tools(
        json.dumps(
            [
                {"name": "lookup", "url": f"{url}/tools/lookup", "idempotent": True},
                {"name": "note", "url": f"{url}/tools/note", "api_key_env": "LOOP_TOOL_KEY"},
                {
                    "name": "researcher",
                    "kind": "agent",
                    "model": "agent-m",
                    "instructions": "Research it.",
                    "tools": ["lookup"],
                    "body": {"mock_tool_script": [[call("lookup", q="nested")]]},
                },
                {
                    "name": "looper",
                    "kind": "agent",
                    "model": "agent-m",
                    "tools": ["looper"],
                    "body": {"mock_tool_script": [[call("looper", input="again")]]},
                },
            ]
        )
    )


@pytest.fixture
def loop_settings(
    settings: Settings, tool_server: MockTools, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    monkeypatch.setenv("LOOP_TOOL_KEY", "sk-tool-SECRET")
    return settings.replace(tools=tools_config(tool_server.url))


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def rline(custom_id: str, script: list[list[dict[str, Any]]], **body: Any) -> dict[str, Any]:
    """A /v1/responses line whose model asks for ``script``'s calls, turn by turn."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/responses",
        "body": {
            "model": "m1",
            "input": f"question {custom_id}",
            "mock_tool_script": script,
            **body,
        },
    }


def run_all(client: Client, settings: Settings, timeout: float = 20.0) -> None:
    """Claim and run until nothing is left to run, retries included (due ones at once)."""
    rec = Recorder()
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        claimer.claim_all(client.store, settings, rec.publish)
        if not rec.messages and not rec.retries:
            return
        run_claimed(client.store, settings, rec)
        while rec.retries:
            ids, delay = rec.retries.pop(0)
            token = rec.retry_tokens.pop(0)
            time.sleep(max(delay - 0.9, 0))  # a retry may start up to 1 s early
            run_message(client.store, settings, token, ids, rec)
    raise AssertionError("the batch did not finish")


def results(client: Client, batch_id: str) -> dict[str, dict[str, Any]]:
    out = {o["custom_id"]: o for o in client.iter_results(batch_id)}
    out.update({o["custom_id"]: o for o in client.iter_results(batch_id, errors=True)})
    return out


def kinds(body: dict[str, Any]) -> list[str]:
    return [
        f"{o['type']}:{o.get('name') or ''}".rstrip(":")
        if o["type"] == "function_call"
        else o["type"]
        for o in body["output"]
    ]


def chat_calls(mock: MockUpstream, custom_id: str) -> list[dict[str, Any]]:
    return [e for e in mock.state.log if e["custom_id"] == custom_id]


@pytest.mark.parametrize("loop_db", ["sqlite", "postgres"])
def test_a_three_step_loop_ends_in_one_response_with_real_ids_and_summed_usage(
    loop_db: str,
    request: pytest.FixtureRequest,
    mock: MockUpstream,
    tool_server: MockTools,
    loop_settings: Settings,
) -> None:
    url = request.getfixturevalue("sqlite_url" if loop_db == "sqlite" else "pg_url")
    settings = loop_settings.replace(database_url=url)
    client = Client(settings)
    script = [[call("lookup", q="a")], [call("note", text="x"), call("lookup", q="b")]]
    batch_id = client.submit_batch([rline("three", script)])
    run_all(client, settings)

    out = results(client, batch_id)["three"]
    body = out["response"]["body"]
    assert out["error"] is None and body["object"] == "response" and body["status"] == "completed"
    assert body["id"].startswith("resp_") and body["model"] == "m1"
    assert kinds(body) == [
        "function_call:lookup",
        "function_call_output",
        "function_call:note",
        "function_call:lookup",
        "function_call_output",
        "function_call_output",
        "message",
    ]
    calls = [o for o in body["output"] if o["type"] == "function_call"]
    outputs = [o for o in body["output"] if o["type"] == "function_call_output"]
    # The mock names a tool call after the sequence number of its chat call: real ids.
    chats = chat_calls(mock, "three")
    assert [c["call_id"] for c in calls] == [
        f"call_mock_{chats[0]['seq']}_0",
        f"call_mock_{chats[1]['seq']}_0",
        f"call_mock_{chats[1]['seq']}_1",
    ]
    assert [o["call_id"] for o in outputs] == [c["call_id"] for c in calls]
    assert json.loads(outputs[1]["output"]) == {
        "tool": "note",
        "arguments": {"text": "x"},
        "call": 1,
    }
    final = body["output"][-1]["content"][0]
    assert final == {"type": "output_text", "text": "reply to three (call 3)", "annotations": []}
    assert body["usage"] == {"input_tokens": 15, "output_tokens": 21, "total_tokens": 36}

    # Three model calls on chat completions, each with the request id; two tool rounds.
    (row,) = client.store.request_rows(batch_id)
    assert [c["path"] for c in chats] == ["/v1/chat/completions"] * 3
    assert {c["headers"]["x-fusillade-request-id"] for c in chats} == {str(row["id"])}
    seen = tool_server.tools.log
    assert sorted(e["tool"] for e in seen) == ["lookup", "lookup", "note"]
    assert {e["request_id"] for e in seen} == {str(row["id"])}
    assert {e["call_id"] for e in seen} == {c["call_id"] for c in calls}
    assert tool_server.tools.calls_of("note")[0]["authorization"] == "Bearer sk-tool-SECRET"
    assert tool_server.tools.calls_of("lookup")[0]["authorization"] is None

    # Each call replays the whole conversation with the real ids.
    steps = client.store.steps_of(row["id"])
    assert [(s.kind, s.state) for s in steps] == [
        ("model_call", "completed"),
        ("tool_call", "completed"),
        ("model_call", "completed"),
        ("tool_call", "completed"),
        ("tool_call", "completed"),
        ("model_call", "completed"),
    ]
    last = steps[-1].request["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "tool", "assistant", "tool", "tool"]
    assert [t["id"] for t in last[3]["tool_calls"]] == [c["call_id"] for c in calls[1:]]
    assert [m["tool_call_id"] for m in last[4:]] == [c["call_id"] for c in calls[1:]]
    offered = [t["function"]["name"] for t in steps[0].request["tools"]]
    assert offered == ["lookup", "note", "researcher", "looper"]


def test_a_reply_asking_for_the_callers_tools_ends_the_loop_and_returns_them(
    client: Client, loop_settings: Settings, mock: MockUpstream, tool_server: MockTools
) -> None:
    mine = {"type": "function", "name": "mine", "parameters": {"type": "object"}}
    client = Client(loop_settings)
    batch_id = client.submit_batch(
        [
            rline("caller", [[call("lookup", q="a")], [call("mine", k=1)]], tools=[mine]),
            rline("mixed", [[call("mine", k=2), call("lookup", q="b")]], tools=[mine]),
        ]
    )
    run_all(client, loop_settings)
    out = results(client, batch_id)
    caller = out["caller"]["response"]["body"]
    assert kinds(caller) == ["function_call:lookup", "function_call_output", "function_call:mine"]
    assert caller["output"][-1]["arguments"] == '{"k":1}'
    mixed = out["mixed"]["response"]["body"]
    # The server's own call in the same reply runs; the caller's is the caller's to answer.
    assert kinds(mixed) == ["function_call:mine", "function_call:lookup", "function_call_output"]
    assert mixed["output"][2]["call_id"] == mixed["output"][1]["call_id"]
    assert len(chat_calls(mock, "caller")) == 2 and len(chat_calls(mock, "mixed")) == 1
    (row, _) = sorted(client.store.request_rows(batch_id), key=lambda r: r["custom_id"])
    first = client.store.steps_of(row["id"])[0].request
    assert [t["function"]["name"] for t in first["tools"]][-1] == "mine"  # beside ours


def test_an_agent_tool_runs_a_nested_loop_of_its_own_model(
    loop_settings: Settings, mock: MockUpstream, tool_server: MockTools
) -> None:
    client = Client(loop_settings)
    batch_id = client.submit_batch([rline("agent", [[call("researcher", input="dig")]])])
    run_all(client, loop_settings)
    body = results(client, batch_id)["agent"]["response"]["body"]
    assert kinds(body) == ["function_call:researcher", "function_call_output", "message"]
    # The agent's final text is the call's output: its second model call (after its lookup).
    assert body["output"][1]["output"] == "reply to agent (call 3)"
    assert body["usage"]["total_tokens"] == 4 * 12  # two top-level calls, two nested
    assert [e["model"] for e in chat_calls(mock, "agent")] == ["m1", "agent-m", "agent-m", "m1"]
    assert [e["arguments"] for e in tool_server.tools.log] == [{"q": "nested"}]
    (row,) = client.store.request_rows(batch_id)
    steps = client.store.steps_of(row["id"])
    agent_step = next(s for s in steps if s.name == "researcher")
    nested = [s for s in steps if s.parent_id == agent_step.id]
    assert [(s.kind, s.name) for s in nested] == [
        ("model_call", "agent-m"),
        ("tool_call", "lookup"),
        ("model_call", "agent-m"),
    ]
    assert nested[0].request["messages"] == [
        {"role": "system", "content": "Research it."},
        {"role": "user", "content": "dig"},
    ]


def test_the_caps_fail_the_request_with_response_loop_failed_and_no_retry(
    loop_settings: Settings, mock: MockUpstream, tool_server: MockTools
) -> None:
    capped = loop_settings.replace(responses_max_iterations=3, responses_max_depth=2)
    client = Client(capped)
    endless = [[call("lookup", q=str(i))] for i in range(10)]
    batch_id = client.submit_batch(
        [rline("iterations", endless), rline("depth", [[call("looper", input="go")]])]
    )
    run_all(client, capped)
    out = results(client, batch_id)
    rows = {r["custom_id"]: r for r in client.store.request_rows(batch_id)}
    for cid, reason in (("iterations", "max_iterations_exceeded"), ("depth", "max_depth_exceeded")):
        assert out[cid]["error"]["code"] == "response_loop_failed", out[cid]
        assert out[cid]["error"]["message"].startswith(reason)
        assert rows[cid]["state"] == "failed" and rows[cid]["attempt"] == 0
        assert json.loads(rows[cid]["error"])["reason"] == reason
    assert len(chat_calls(mock, "iterations")) == 3  # the third call's tools are not run
    assert len([e for e in tool_server.tools.log if e["tool"] == "lookup"]) == 2
    # top (depth 0) -> looper (1) -> looper (2); a third level is refused before it starts.
    assert [e["model"] for e in chat_calls(mock, "depth")] == ["m1", "agent-m", "agent-m"]


def test_tool_failures_are_given_to_the_model_not_to_the_output_file(
    loop_settings: Settings, mock: MockUpstream, tool_server: MockTools
) -> None:
    client = Client(loop_settings)
    script = [
        [
            call("lookup", q="flaky", mock_statuses=[503, 200]),
            call("lookup", q="gone", mock_statuses=[404]),
            call("note", text="down", mock_statuses=[500]),
            call("note", text="plain", mock_text=True),
        ]
    ]
    batch_id = client.submit_batch([rline("fails", script)])
    run_all(client, loop_settings)
    body = results(client, batch_id)["fails"]["response"]["body"]
    outputs = [o["output"] for o in body["output"] if o["type"] == "function_call_output"]
    assert json.loads(outputs[0])["arguments"] == {"q": "flaky"}  # retried, then answered
    assert json.loads(outputs[1]) == {"error": "the tool lookup answered HTTP 404"}
    assert json.loads(outputs[2]) == {"error": "the tool note answered HTTP 500"}
    assert json.loads(outputs[3]) == {"result": 'note says {"text": "plain"}'}
    assert ERROR_BODY_MARK not in json.dumps(body)
    tries = {e["arguments"].get("q") or e["arguments"]["text"]: 0 for e in tool_server.tools.log}
    for e in tool_server.tools.log:
        tries[e["arguments"].get("q") or e["arguments"]["text"]] += 1
    # Transient: retried for an idempotent tool only; a 404 is not transient.
    assert tries == {"flaky": 2, "gone": 1, "down": 1, "plain": 1}
    assert body["output"][-1]["type"] == "message"


class Dies:
    """``call_http`` whose first call with ``mark`` in its arguments dies mid-call, as a
    worker would (the step stays ``started``; the request is retried as task_terminated)."""

    def __init__(self, mark: str):
        self.mark = mark
        self.died = False

    def __call__(self, session: Any, tool: Any, arguments: str, *args: Any) -> Any:
        if self.mark in arguments and not self.died:
            self.died = True
            raise RuntimeError("the worker died here")
        return real_call_http(session, tool, arguments, *args)


real_call_http = responses_loop.call_http


@pytest.mark.parametrize(("tool", "ends"), [("lookup", "completed"), ("note", "failed")])
def test_a_retry_resumes_the_chain_and_never_resends_a_non_idempotent_call(
    tool: str,
    ends: str,
    loop_settings: Settings,
    mock: MockUpstream,
    tool_server: MockTools,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(responses_loop, "call_http", Dies("second"))
    client = Client(loop_settings)
    # The third chat call of the custom_id (the first after the interrupted tool call) fails
    # once with a 503: the model call is sent again, the steps before it are not.
    script = [[call("note", text="first")], [call(tool, q="second", text="second")]]
    batch_id = client.submit_batch([rline("resume", script, mock_statuses=[200, 200, 503, 200])])
    run_all(client, loop_settings)
    (row,) = client.store.request_rows(batch_id)
    assert row["state"] == ends
    steps = client.store.steps_of(row["id"])
    notes = [e for e in tool_server.tools.log if e["tool"] == "note"]
    if ends == "failed":
        assert json.loads(row["error"])["kind"] == "step_abandoned"
        assert [e["arguments"]["text"] for e in notes] == ["first"]  # never sent twice
        assert len(chat_calls(mock, "resume")) == 2
        assert steps[-1].state == "started"
        return
    body = json.loads(row["response_body"])
    assert kinds(body)[-1] == "message" and len(body["output"]) == 5
    assert [e["arguments"]["text"] for e in notes] == ["first"]  # completed: not repeated
    assert len(tool_server.tools.calls_of("lookup")) == 1  # sent (again) once it was retried
    assert len(chat_calls(mock, "resume")) == 4  # 2, then the 503, then its resend
    assert [(s.kind, s.attempts) for s in steps] == [
        ("model_call", 1),
        ("tool_call", 1),
        ("model_call", 1),
        ("tool_call", 2),
        ("model_call", 2),
    ]
    assert body["usage"]["total_tokens"] == 3 * 12


def test_the_loops_model_calls_stream_and_give_the_same_response(
    loop_settings: Settings, mock: MockUpstream, tool_server: MockTools
) -> None:
    script = [[call("lookup", q="a")], [call("note", text="b"), call("lookup", q="c")]]
    bodies = []
    for streamed in (False, True):
        mock.state.reset()
        tool_server.tools.reset()
        settings = loop_settings.replace(
            stream_endpoints=frozenset({"/v1/chat/completions"} if streamed else set())
        )
        client = Client(settings)
        batch_id = client.submit_batch([rline("s", script)])
        run_all(client, settings)
        bodies.append(results(client, batch_id)["s"]["response"]["body"])
        assert [bool(e.get("stream")) for e in chat_calls(mock, "s")] == [streamed] * 3
    plain, streamed_body = bodies
    assert streamed_body["output"] == plain["output"] and streamed_body["usage"] == plain["usage"]


def test_a_model_without_server_side_tools_sends_responses_upstream_as_one_call(
    loop_settings: Settings, mock: MockUpstream, tool_server: MockTools
) -> None:
    only_big = parse_tools(
        json.dumps(
            {
                "tools": [{"name": "lookup", "url": "http://x"}],
                "models": {"big": ["lookup"], "*": []},
            }
        )
    )
    settings = loop_settings.replace(tools=only_big)
    client = Client(settings)
    batch_id = client.submit_batch([rline("plain", [[call("lookup")]])])
    run_all(client, settings)
    body = results(client, batch_id)["plain"]["response"]["body"]
    assert body["object"] == "response" and body["id"].startswith("resp_mock_")
    assert [e["path"] for e in chat_calls(mock, "plain")] == ["/v1/responses"]
    (row,) = client.store.request_rows(batch_id)
    assert client.store.steps_of(row["id"]) == []


def test_unsupported_input_fails_as_a_builder_error_without_a_call(
    loop_settings: Settings, mock: MockUpstream
) -> None:
    client = Client(loop_settings)
    batch_id = client.submit_batch([rline("prev", [], previous_response_id="resp_1")])
    run_all(client, loop_settings)
    error = results(client, batch_id)["prev"]["error"]
    assert error["code"] == "builder_error" and "previous_response_id" in error["message"]
    assert mock.state.calls == 0


def test_steps_are_fenced_and_purged_with_their_request(
    loop_settings: Settings, mock: MockUpstream, tool_server: MockTools
) -> None:
    client = Client(loop_settings)
    batch_id = client.submit_batch([rline("gone", [[call("lookup", q="a")]])])
    run_all(client, loop_settings)
    (row,) = client.store.request_rows(batch_id)
    steps = client.store.steps_of(row["id"])
    assert len(steps) == 3
    # The request is no longer processing under any token: nothing is written.
    step = steps[0]
    assert client.store.begin_steps(row["id"], row["claim_token"], [], time.time()) is None
    assert not client.store.end_step(row["id"], row["claim_token"], step.id, "failed", {}, 0.0)
    assert client.store.steps_of(row["id"])[0] == step
    client.delete_batch(batch_id)
    maintenance.purge(client.store, loop_settings.replace(purge_throttle_ms=0))
    assert client.store.steps_of(row["id"]) == []


def test_the_demo_with_tools_runs_three_step_loops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fusillade_celery.demo import run_demo

    assert run_demo(tmp_path, 10, quiet=True, tools=True) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
    assert (summary["upstream_calls"], summary["tool_calls"]) == (40, 10)  # 3 + 1 nested each
    (first, *_) = [json.loads(x) for x in (tmp_path / "output.jsonl").read_text().splitlines()]
    assert kinds(first["response"]["body"]) == [
        "function_call:get_weather",
        "function_call_output",
        "function_call:summarizer",
        "function_call_output",
        "message",
    ]
