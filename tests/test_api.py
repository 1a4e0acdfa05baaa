"""The HTTP API as a user meets it: ``fusillade-celery serve`` on the embedded default (SQLite,
the in-process worker beside it) as a real uvicorn process, driven by the official ``openai``
SDK and by curl, against the project's mock upstream."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
from openai.types import Batch

from fusillade_celery.mock_upstream import MockConfig, MockUpstream
from fusillade_celery.settings import Settings
from fusillade_celery.submit import Client

from .api_server import CLI, TERMINAL, Server, jsonl, make_key, server_env, serving
from .conftest import line
from .services import wait_for

MAX_FILE_BYTES = 200_000


@pytest.fixture(scope="module")
def mock() -> Iterator[MockUpstream]:
    with MockUpstream(MockConfig()) as m:
        yield m


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mock: MockUpstream) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("api")
    env = server_env(
        f"sqlite:///{tmp / 'api.sqlite3'}",
        mock.url,
        model_limits="slow=2,m1=8",
        max_file_bytes=str(MAX_FILE_BYTES),
    )
    refused = subprocess.run(
        [*CLI, "serve", "--port", "0"], env=env, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "no API key in the database" in refused.stderr
    exposed = subprocess.run(
        [*CLI, "serve", "--port", "0", "--no-auth", "--host", "0.0.0.0"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert exposed.returncode == 2 and "only on a loopback address" in exposed.stderr
    env["KEY_A"], env["KEY_B"] = make_key(env, "team-a"), make_key(env, "team-b")
    with serving(env, tmp / "serve.log") as s:
        yield s


@pytest.fixture(scope="module")
def local(server: Server) -> Client:
    """The Python helper on the server's SQLite file: what the API must agree with."""
    return Client(Settings.from_env(server.env))


def wait_done(sdk: openai.OpenAI, batch_id: str, timeout: float = 30) -> Batch:
    return wait_for(
        lambda: (b := sdk.batches.retrieve(batch_id)).status in TERMINAL and b,
        timeout,
        what=f"{batch_id} to finish",
    )


def test_upload_create_poll_and_download_with_the_openai_sdk(
    server: Server, local: Client, mock: MockUpstream, tmp_path: Path
) -> None:
    """Given a key, when a file is uploaded, a batch created and polled with the SDK, then its
    output and error files hold exactly what ``iter_results`` gives, curl uploads the same
    file, and the upstream saw the server's key, never the caller's."""
    sdk = server.sdk(server.env["KEY_A"])
    lines = [line(f"rt{i}", model="m1") for i in range(30)]
    lines.append(line("rt-bad", model="m1", mock_statuses=[400]))
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(lines))
    with src.open("rb") as fh:
        uploaded = sdk.files.with_raw_response.create(file=fh, purpose="batch")
    assert uploaded.headers["x-request-id"].startswith("req_")
    f = uploaded.parse()
    assert (f.object, f.purpose, f.filename, f.bytes) == (
        "file",
        "batch",
        "in.jsonl",
        len(src.read_bytes()),
    )
    batch = sdk.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"team": "search"},
    )
    assert batch.status in ("validating", "in_progress", "finalizing", "completed")
    assert batch.output_file_id and batch.error_file_id and batch.metadata == {"team": "search"}
    done = wait_done(sdk, batch.id)
    assert done.status == "completed" and done.model == "m1"
    assert done.request_counts.model_dump() == {"total": 31, "completed": 30, "failed": 1}
    assert done.usage is not None and done.usage.total_tokens == 30 * 12
    assert isinstance(done.completed_at, int) and done.in_progress_at is not None
    out = [json.loads(x) for x in sdk.files.content(done.output_file_id).text.splitlines()]
    err = [json.loads(x) for x in sdk.files.content(done.error_file_id).text.splitlines()]
    assert out == list(local.iter_results(batch.id))
    assert err == list(local.iter_results(batch.id, errors=True))
    assert [o["custom_id"] for o in out] == [f"rt{i}" for i in range(30)]
    assert err[0]["error"]["code"] == "non_retriable_http_status"
    ids = [o["id"] for o in out]
    assert len(set(ids)) == 30 and all(len(i) == len("batch_req_") + 24 for i in ids)
    seen = {e["headers"].get("authorization") for e in mock.state.log if e["custom_id"] == "rt0"}
    assert seen == {"Bearer sk-upstream-SECRET-77"}
    curl = subprocess.run(
        [
            "curl", "-sS", "--fail-with-body", server.url + "/v1/files",
            "-H", f"Authorization: Bearer {server.env['KEY_A']}",
            "-F", "purpose=batch", "-F", f"file=@{src};type=application/octet-stream",
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    by_curl = json.loads(curl.stdout)
    assert by_curl["bytes"] == f.bytes and by_curl["filename"] == "in.jsonl"
    assert sdk.files.content(by_curl["id"]).text == sdk.files.content(f.id).text
    listed = sdk.files.list(purpose="batch")
    assert [x.id for x in listed.data[:2]] == [by_curl["id"], f.id]
    assert sdk.files.delete(by_curl["id"]).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(by_curl["id"])


def test_a_bad_line_is_a_400_naming_it_and_stores_nothing(server: Server) -> None:
    sdk = server.sdk(server.env["KEY_A"])
    before = [x.id for x in sdk.files.list().data]
    bad = jsonl([line("a"), line("b")]) + b'{"custom_id": "a", "method": "POST"}\n'
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("bad.jsonl", bad), purpose="batch")
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "custom_id"
    assert "line 3" in error["message"] and "duplicate custom_id" in error["message"]
    assert caught.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.BadRequestError, match="purpose"):
        sdk.files.create(file=("x.jsonl", jsonl([line("p")])), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="body.model"):
        sdk.files.create(file=("x.jsonl", jsonl([line("u", model="no model")])), purpose="batch")
    assert [x.id for x in sdk.files.list().data] == before


def test_file_size_limit_is_a_413_by_header_and_by_count(server: Server) -> None:
    key = server.env["KEY_A"]
    big = jsonl([line(f"big{i}", pad="x" * 900) for i in range(300)])
    assert len(big) > MAX_FILE_BYTES
    with pytest.raises(openai.APIStatusError) as caught:
        server.sdk(key).files.create(file=("big.jsonl", big), purpose="batch")
    assert caught.value.status_code == 413
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
    ).encode()
    chunked = requests.post(  # no Content-Length: the bytes are counted as they arrive
        server.url + "/v1/files",
        data=iter([head, big, f"\r\n--{boundary}--\r\n".encode()]),
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
        timeout=30,
    )
    assert chunked.status_code == 413, chunked.text
    assert chunked.json()["error"]["code"] == "file_too_large"


def test_keys_keep_tenants_apart(server: Server, local: Client, tmp_path: Path) -> None:
    """Another key's batch and files are 404; a missing, wrong or revoked key is 401; a batch
    the CLI submits with --owner is that owner's."""
    a, b = server.sdk(server.env["KEY_A"]), server.sdk(server.env["KEY_B"])
    f = a.files.create(file=("t.jsonl", jsonl([line("ten0")])), purpose="batch")
    batch = a.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h"
    )
    for call in (
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
        lambda: b.files.retrieve(f.id),
        lambda: b.files.content(batch.output_file_id or ""),
        lambda: b.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [x.id for x in b.batches.list()]
    with pytest.raises(openai.AuthenticationError):
        server.sdk("fsk-not-a-key").batches.list()
    bare = requests.get(server.url + "/v1/batches", timeout=10)
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "missing_api_key"
    src = tmp_path / "cli.jsonl"
    src.write_bytes(jsonl([line("own0")]))
    submitted = subprocess.run(
        [*CLI, "submit", str(src), "--owner", "team-b"],
        env=server.env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    by_cli = b.batches.retrieve(submitted)
    assert by_cli.id == submitted and by_cli.output_file_id
    assert b.files.retrieve(by_cli.output_file_id).purpose == "batch_output"
    with pytest.raises(openai.NotFoundError):
        a.batches.retrieve(submitted)
    c_key = make_key(server.env, "team-c")
    c = server.sdk(c_key)
    assert c.batches.list().data == []
    key_id = next(
        k["id"]
        for k in map(json.loads, _cli(server, "keys", "list", "--json").splitlines())
        if k["name"] == "team-c"
    )
    assert c_key not in _cli(server, "keys", "list")  # shown once, at creation
    _cli(server, "keys", "revoke", key_id)
    wait_for(lambda: _refused(c), 5, what="the revoked key refused (within auth.CACHE_S)")


def _refused(sdk: openai.OpenAI) -> bool:
    try:
        sdk.batches.list()
    except openai.AuthenticationError:
        return True
    return False


def _cli(server: Server, *args: str) -> str:
    return subprocess.run(
        [*CLI, *args], env=server.env, capture_output=True, text=True, check=True
    ).stdout


def test_cancel_mid_run(server: Server, mock: MockUpstream) -> None:
    sdk = server.sdk(server.env["KEY_A"])
    lines = [line(f"cx{i}", model="slow", mock_latency_ms=2000) for i in range(12)]
    f = sdk.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h"
    )
    wait_for(lambda: mock.state.in_flight["slow"] > 0, 20, what="a call in flight")
    cancelled = sdk.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
    done = wait_done(sdk, batch.id)
    assert done.status == "cancelled"
    counts = done.request_counts
    assert counts is not None and counts.completed + counts.failed == counts.total == 12
    assert sum(mock.state.by_custom_id[f"cx{i}"] for i in range(12)) <= 2
    errors = sdk.files.content(done.error_file_id or "").text
    assert errors.count('"batch_cancelled"') == 12
    with pytest.raises(openai.ConflictError) as caught:  # finished: nothing to cancel
        finished = sdk.files.create(file=("q.jsonl", jsonl([line("cq")])), purpose="batch")
        quick = sdk.batches.create(
            input_file_id=finished.id, endpoint="/v1/chat/completions", completion_window="1h"
        )
        wait_done(sdk, quick.id)
        sdk.batches.cancel(quick.id)
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_list_pages_newest_first_and_retry_of_failed_requests(server: Server) -> None:
    sdk = server.sdk(make_key(server.env, "pager"))
    made = []
    for i in range(5):
        lines = [line(f"pg{i}-ok"), line(f"pg{i}-flaky", mock_statuses=[400, 200])]
        f = sdk.files.create(file=(f"p{i}.jsonl", jsonl(lines)), purpose="batch")
        made.append(
            sdk.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h"
            ).id
        )
    first = sdk.batches.list(limit=2)
    assert first.has_more and len(first.data) == 2
    assert [b.id for b in first] == made[::-1]  # auto-paging: every page, newest first
    last = made[0]
    failed = wait_done(sdk, last)
    assert failed.request_counts is not None and failed.request_counts.failed == 1
    retried = sdk.post(f"/batches/{last}/retry", cast_to=Batch)
    assert retried.status == "in_progress" and retried.completed_at is None
    assert retried.expires_at > failed.expires_at - 1
    again = wait_done(sdk, last)
    assert again.status == "completed"
    assert again.request_counts.model_dump() == {"total": 2, "completed": 2, "failed": 0}
    assert sdk.files.content(again.error_file_id or "").text == ""
    with pytest.raises(openai.ConflictError, match="no failed request"):
        sdk.post(f"/batches/{last}/retry", cast_to=Batch)
    reply = sdk.delete(f"/batches/{last}", cast_to=object)
    assert reply == {"id": last, "object": "batch", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve(last)


def test_errors_are_openai_error_objects(server: Server) -> None:
    key = {"Authorization": f"Bearer {server.env['KEY_A']}"}
    for method, path, status in (
        ("GET", "/v1/nothing", 404),
        ("PUT", "/v1/batches", 405),
        ("GET", "/v1/batches?limit=0", 400),
        ("POST", "/v1/batches", 400),
        ("POST", "/v1/files", 400),
        ("GET", "/v1/batches/batch_nope", 404),
    ):
        reply = requests.request(method, server.url + path, headers=key, timeout=10)
        assert reply.status_code == status, (path, reply.text)
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
        assert reply.headers["x-request-id"].startswith("req_")
        assert "Traceback" not in reply.text and "<html" not in reply.text.lower()
    health = requests.get(server.url + "/healthz", timeout=10)
    assert health.json() == {"status": "ok", "database": "ok", "broker": "in-process"}
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert "fusillade_requests_completed_total" in metrics
    assert server.env["KEY_A"] not in server.logs() and "sk-upstream" not in server.logs()
