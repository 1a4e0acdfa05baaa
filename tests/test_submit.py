"""Submitting: what is accepted, and every bad-input rule refusing with the line and field
named and zero rows created (docs/architecture.md invariant 7). Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from fusillade_celery import schema
from fusillade_celery.cli import main
from fusillade_celery.submit import Client
from fusillade_celery.validation import InputError

from .conftest import line


def row_counts(client: Client) -> dict[str, int]:
    with client.store.engine.connect() as conn:
        return {
            t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (schema.files, schema.request_templates, schema.batches, schema.requests)
        }


def jsonl(*objs: object) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def test_accepts_a_path_a_binary_stream_a_text_stream_and_dicts(
    client: Client, tmp_path: Path
) -> None:
    data = jsonl(line("a"), line("b", model="m2"))
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    ids = [
        client.submit_batch(path),
        client.submit_batch(io.BytesIO(data)),
        client.submit_batch(io.StringIO(data.decode())),
        client.submit_batch([line("a"), line("b", model="m2")]),
    ]
    for batch_id in ids:
        batch = client.get_batch(batch_id)
        assert batch["status"] == "validating"
        assert batch["endpoint"] == "/v1/chat/completions"
        assert batch["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
        assert batch["expires_at"] - batch["created_at"] in (86399, 86400, 86401)
    assert row_counts(client)["requests"] == 8
    stored = list(client.iter_file(client.get_batch(ids[0])["input_file_id"]))
    assert [s["custom_id"] for s in stored] == ["a", "b"]
    assert stored[1]["body"]["model"] == "m2"


def test_endpoint_defaults_to_the_lines_url_and_metadata_is_kept(client: Client) -> None:
    batch_id = client.submit_batch(
        [line("a", url="/v1/embeddings")], completion_window="2h", metadata={"team": "search"}
    )
    batch = client.get_batch(batch_id)
    assert batch["endpoint"] == "/v1/embeddings"
    assert batch["completion_window"] == "2h"
    assert batch["metadata"] == {"team": "search"}


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, client: Client) -> Client:
    monkeypatch.setenv("FUSILLADE_DATABASE_URL", client.settings.database_url)
    monkeypatch.setenv("FUSILLADE_UPSTREAM_URL", client.settings.upstream_url)
    monkeypatch.delenv("FUSILLADE_BROKER_URL", raising=False)
    return client


BIG = "x" * 2048

BAD_INPUTS = [
    # (id, raw file bytes, expected line, expected field, fragment of the message)
    ("not json", jsonl(line("a")) + b"{not json}\n", 2, None, "not valid JSON"),
    ("not utf-8", jsonl(line("a")) + b'{"custom_id": "\xff"}\n', 2, None, "UTF-8"),
    ("not an object", jsonl(line("a")) + b"[1, 2]\n", 2, None, "JSON object"),
    (
        "missing custom_id",
        jsonl(line("a"), {k: v for k, v in line("b").items() if k != "custom_id"}),
        2,
        "custom_id",
        "required",
    ),
    ("custom_id not a string", jsonl({**line("a"), "custom_id": 5}), 1, "custom_id", "string"),
    ("custom_id too long", jsonl(line("a" * 65)), 1, "custom_id", "64"),
    ("duplicate custom_id", jsonl(line("a"), line("b"), line("a")), 3, "custom_id", "duplicate"),
    ("method GET", jsonl({**line("a"), "method": "GET"}), 1, "method", "POST"),
    ("unsupported url", jsonl(line("a", url="/v1/images")), 1, "url", "unsupported"),
    ("mixed urls", jsonl(line("a"), line("b", url="/v1/embeddings")), 2, "url", "one endpoint"),
    ("body not an object", jsonl({**line("a"), "body": "hi"}), 1, "body", "object"),
    (
        "model missing",
        jsonl(line("a"), {**line("b"), "body": {"messages": []}}),
        2,
        "body.model",
        "required",
    ),
    ("model with spaces", jsonl(line("a", model="gpt 4")), 1, "body.model", "valid model"),
    (
        "oversized line",
        jsonl(line("a"), line("b", content=BIG)),
        2,
        None,
        "FUSILLADE_MAX_LINE_BYTES",
    ),
    ("empty file", b"\n\n", None, None, "no requests"),
    ("NUL in custom_id", jsonl(line("a"), line("b\x00c")), 2, "custom_id", "NUL"),
    ("control in model", jsonl(line("a", model="gpt\x00")), 1, "body.model", "valid model"),
    ("NaN in body", jsonl(line("a"), line("b", temperature=float("nan"))), 2, "body", "NaN"),
]


def test_lines_given_as_objects_meet_the_same_size_limits(client: Client) -> None:
    """The Python API's dict lines: the line and file limits hold as they do for a file."""
    client.settings = client.settings.replace(max_line_bytes=1024, max_file_bytes=3000)
    before = row_counts(client)
    with pytest.raises(InputError, match="FUSILLADE_MAX_LINE_BYTES") as err:
        client.submit_batch([line("a"), line("b", content=BIG)])
    assert err.value.line == 2
    with pytest.raises(InputError, match="FUSILLADE_MAX_FILE_BYTES") as err:
        client.submit_batch([line(f"r{i}", content="x" * 700) for i in range(5)])
    assert err.value.line == 4
    assert row_counts(client) == before


@pytest.mark.parametrize(
    ("raw", "line_no", "field", "fragment"),
    [c[1:] for c in BAD_INPUTS],
    ids=[c[0] for c in BAD_INPUTS],
)
def test_bad_input_is_refused_naming_the_line_and_leaves_no_rows(
    client: Client,
    tmp_path: Path,
    raw: bytes,
    line_no: int | None,
    field: str | None,
    fragment: str,
) -> None:
    client.settings = client.settings.replace(max_line_bytes=1024)
    client.submit_batch([line("keep")])  # an earlier, valid batch must stay as it is
    before = row_counts(client)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(raw)
    with pytest.raises(InputError) as err:
        client.submit_batch(path)
    assert err.value.line == line_no
    assert err.value.field == field
    assert fragment in str(err.value)
    if line_no is not None:
        assert str(err.value).startswith(f"line {line_no}")
    assert row_counts(client) == before


@pytest.mark.parametrize(
    ("raw", "line_no", "field", "fragment"),
    [c[1:] for c in BAD_INPUTS],
    ids=[c[0] for c in BAD_INPUTS],
)
def test_cli_refuses_every_bad_input_with_exit_2(
    cli_env: Client,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    raw: bytes,
    line_no: int | None,
    field: str | None,
    fragment: str,
) -> None:
    monkeypatch.setenv("FUSILLADE_MAX_LINE_BYTES", "1024")
    path = tmp_path / "bad.jsonl"
    path.write_bytes(raw)
    assert main(["submit", str(path)]) == 2
    captured = capsys.readouterr()
    (message,) = captured.err.strip().splitlines()  # one line, no traceback
    assert message.startswith("fusillade-celery: error: invalid input: ")
    assert fragment in message
    if line_no is not None:
        assert f"line {line_no}" in message
    assert captured.out == ""
    assert row_counts(cli_env)["batches"] == 0


def test_oversized_file_is_refused(client: Client) -> None:
    client.settings = client.settings.replace(max_file_bytes=500)
    lines = [line(f"r{i}") for i in range(20)]
    with pytest.raises(InputError, match="FUSILLADE_MAX_FILE_BYTES") as err:
        client.submit_batch(io.BytesIO(jsonl(*lines)))
    assert err.value.line is not None and err.value.line > 1
    assert row_counts(client)["batches"] == 0


def test_unknown_model_without_route_or_upstream(client: Client) -> None:
    client.settings = client.settings.replace(upstream_url="", routes={})
    with pytest.raises(InputError, match="unknown model 'm9'") as err:
        client.submit_batch([line("a", model="m9")])
    assert (err.value.line, err.value.field) == (1, "body.model")
    # the same file is accepted when the call names an upstream
    assert client.submit_batch([line("a", model="m9")], upstream="http://127.0.0.1:9")
    assert row_counts(client)["batches"] == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"completion_window": "soon"}, "completion_window"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"upstream": "ftp://x"}, "upstream"),
        ({"endpoint": "/v1/nope"}, "endpoint"),
    ],
)
def test_bad_arguments_are_refused(client: Client, kwargs: dict, field: str) -> None:
    with pytest.raises(InputError) as err:
        client.submit_batch([line("a")], **kwargs)
    assert err.value.field == field
    assert row_counts(client)["batches"] == 0


def test_cli_refuses_bad_input_with_one_line_and_exit_2(
    cli_env: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(line("a"), line("a")))
    assert main(["submit", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fusillade-celery: error: invalid input: line 2, field 'custom_id': duplicate custom_id 'a'"
    ]
    assert row_counts(cli_env)["batches"] == 0


def test_cli_submit_status_results_cancel(
    cli_env: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_bytes(jsonl(line("a"), line("b")))
    assert main(["submit", str(path), "--metadata", "k=v"]) == 0
    batch_id = capsys.readouterr().out.strip()
    assert batch_id.startswith("batch_")
    assert main(["status", batch_id]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["id"] == batch_id and status["metadata"] == {"k": "v"}
    assert main(["cancel", batch_id]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "cancelling"
    assert main(["results", batch_id, "--errors"]) == 0
    errors = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [e["error"]["code"] for e in errors] == ["batch_cancelled", "batch_cancelled"]
    assert main(["status", "batch_nope"]) == 2
    assert "no batch 'batch_nope'" in capsys.readouterr().err


def test_cli_run_again_resumes_whatever_the_upstream_trailing_slash(
    cli_env: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--upstream http://host/`` is stored without its slash; the re-run that resumes an
    interrupted batch must look it up the same way, or it sends every request again."""
    path = tmp_path / "ok.jsonl"
    path.write_bytes(jsonl(line("a")))
    upstream = cli_env.settings.upstream_url + "/"
    assert main(["run", "-q", str(path), "--upstream", upstream]) == 0
    capsys.readouterr()
    assert main(["run", "-q", str(path), "--upstream", upstream]) == 0
    assert "resuming batch_" in capsys.readouterr().err
    assert row_counts(cli_env)["batches"] == 1


def test_cli_usage_mistakes_are_one_line_before_anything_is_created(
    cli_env: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_bytes(jsonl(line("a")))
    assert main(["submit", str(path), "--metadata", "foo"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fusillade-celery: error: --metadata expects key=value, got 'foo'"
    ]
    # checked before the run, not after it has done the work
    out = tmp_path / "nodir" / "out.jsonl"
    assert main(["run", str(path), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"fusillade-celery: error: no such directory for {out}: {out.parent}"
    ]
    assert row_counts(cli_env)["batches"] == 0


def test_cli_small_things_a_shell_user_meets(
    cli_env: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file saved with a byte order mark is read; an empty file's error says it once;
    ``results | head -1`` ends quietly."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + jsonl(*(line(f"r{i}") for i in range(3000))))
    assert main(["submit", str(bom)]) == 0
    batch_id = capsys.readouterr().out.strip()
    assert cli_env.get_batch(batch_id)["request_counts"]["total"] == 3000
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n")
    assert main(["submit", str(empty)]) == 2
    assert capsys.readouterr().err.strip() == (
        "fusillade-celery: error: invalid input: the file holds no requests"
    )
    cli_env.cancel_batch(batch_id)  # 3,000 error lines to read
    res = subprocess.run(
        f"{sys.executable} -m fusillade_celery.cli results {batch_id} --errors | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(res.stdout)["custom_id"] == "r0"
    assert res.stderr == ""


def test_cli_bad_configuration_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FUSILLADE_MODEL_LIMITS", "gpt-4")
    assert main(["status", "batch_x"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith("fusillade-celery: error: configuration: FUSILLADE_MODEL_LIMITS")
    )


def test_cli_bad_configuration_is_one_line_in_a_fresh_process(tmp_path: Path) -> None:
    """As a user meets it: the package is imported (and configured from the environment)
    before the CLI's error handling runs; the bad setting still comes out as one line."""
    env = {**os.environ, "FUSILLADE_MODEL_LIMITS": "gpt-4:8"}
    for args in (["status", "batch_x"], ["--help"]):
        res = subprocess.run(
            [sys.executable, "-m", "fusillade_celery.cli", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if args == ["--help"]:
            assert res.returncode == 0 and "usage:" in res.stdout
            continue
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == [
            "fusillade-celery: error: configuration: FUSILLADE_MODEL_LIMITS: expected "
            "name=value, got 'gpt-4:8'"
        ]


def test_pollers_may_take_cached_counts_but_a_finished_batch_reads_final_ones(
    client: Client,
) -> None:
    import time

    from fusillade_celery import maintenance
    from fusillade_celery.states import RequestState
    from fusillade_celery.store import Finish

    batch_id = client.submit_batch([line("a"), line("b")])
    assert client.get_batch(batch_id, counts_max_age_s=60)["request_counts"]["completed"] == 0
    token, rows = client.store.claim("m1", "m1", 10, 10, time.time())
    ids = [r.id for r in rows]
    client.store.start(ids, token, "w1", time.time())
    client.store.finish([Finish(ids[0], token, RequestState.COMPLETED, 200, "{}")], time.time())
    # a poller accepting 60 s old counts sees the cached ones; a plain read counts afresh
    assert client.get_batch(batch_id, counts_max_age_s=60)["request_counts"]["completed"] == 0
    assert client.get_batch(batch_id)["request_counts"]["completed"] == 1
    client.store.finish([Finish(ids[1], token, RequestState.COMPLETED, 200, "{}")], time.time())
    maintenance.finalize(client.store, client.settings)
    # finished: the cache is bypassed once, and the final counts are exact
    batch = client.get_batch(batch_id, counts_max_age_s=60)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 2, "completed": 2, "failed": 0}


def test_a_batch_upstream_outside_the_allowed_prefixes_is_refused(client: Client) -> None:
    """With FUSILLADE_ALLOWED_UPSTREAMS set, a batch's own upstream must start with one of
    the prefixes, at a path boundary; nothing is stored for a refused one."""
    allowed = Client(
        client.settings.replace(allowed_upstreams=("https://llm.internal", "http://127.0.0.1:9/v"))
    )
    for url in ("https://llm.internal.evil.net", "http://169.254.169.254", "http://127.0.0.1:9"):
        with pytest.raises(InputError) as err:
            allowed.submit_batch([line("a")], upstream=url)
        assert err.value.field == "upstream" and "FUSILLADE_ALLOWED_UPSTREAMS" in str(err.value)
    assert row_counts(client)["batches"] == 0
    assert allowed.submit_batch([line("a")], upstream="https://llm.internal/")
    assert allowed.submit_batch([line("a")], upstream="http://127.0.0.1:9/v/x")
    assert row_counts(client)["batches"] == 2
