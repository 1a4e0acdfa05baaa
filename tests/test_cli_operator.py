"""What an operator meets at the command line: ``celery worker``/``beat`` refusing a bad or
missing setting, ``fusillade-celery`` one-line errors, ``settings``, ``list``, ``--version``,
``run``'s exit status and API key handling, and ``Client.wait_batch``.

Every command that is a process in real use runs here as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import requests

from fusillade_celery import InputError
from fusillade_celery.embedded import run_batch
from fusillade_celery.mock_upstream import MockUpstream
from fusillade_celery.settings import Settings
from fusillade_celery.submit import Client

from .conftest import line

CLI = [sys.executable, "-m", "fusillade_celery.cli"]
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "fusillade-celery")
ERROR_PREFIX = "fusillade-celery: error:"
#: A fixed Fernet key (``Fernet.generate_key()``), so batch API keys are stored sealed.
SECRET_KEY = "u1wfz9l1Sx3qDT5h2sOg1eVdH1CNt1OkzpkqR-jr9Fk="


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any ``FUSILLADE_*`` variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSILLADE_")}
    env.update(settings)
    return env


def cli(
    args: list[str],
    env: dict[str, str],
    cwd: Path,
    stdin: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith(ERROR_PREFIX)]


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def mock_authorizations(mock: MockUpstream) -> list[str]:
    """The ``Authorization`` header of every call the mock saw, from its stats endpoint."""
    stats = requests.get(mock.url + "/_mock/stats", timeout=10).json()
    return [entry["headers"].get("authorization", "") for entry in stats["log"]]


# ------------------------------------------------------------- celery worker / beat


CELERY_ROLES = {
    "worker": ["worker", "-Q", "model.gpt-4", "-P", "gevent"],
    "beat": ["beat", "-s", "{tmp}/bs"],
}


@pytest.mark.parametrize("role", sorted(CELERY_ROLES))
@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (
            {
                "FUSILLADE_BROKER_URL": "redis://127.0.0.1:6379/9",
                "FUSILLADE_MODEL_LIMITS": "gpt-4=abc",
            },
            "FUSILLADE_MODEL_LIMITS",
        ),
        ({}, "FUSILLADE_BROKER_URL"),
    ],
    ids=["bad-model-limits", "no-broker"],
)
def test_celery_worker_and_beat_refuse_a_bad_or_missing_setting(
    tmp_path: Path, role: str, settings: dict[str, str], named: str
) -> None:
    """Before the fix the worker printed a traceback and kept running on Celery's defaults:
    here a running process fails the test at the timeout instead of hanging it."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in CELERY_ROLES[role]]
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "fusillade_celery", *args],
        cwd=tmp_path,
        env=clean_env(**settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"celery {role} still running after 30 s; stderr:\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert named in errors[0]
    assert "Traceback" not in err + out


# ------------------------------------------------------------- fusillade-celery errors


def test_submit_with_a_database_url_that_is_not_a_url_is_one_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [CONSOLE_SCRIPT, "submit", "x.jsonl"],
        env=clean_env(FUSILLADE_DATABASE_URL="notaurl"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    (message,) = res.stderr.strip().splitlines()
    assert message.startswith(ERROR_PREFIX)
    assert "FUSILLADE_DATABASE_URL" in message
    assert "Traceback" not in res.stderr
    assert res.stdout == ""


def test_submit_of_a_directory_says_it_is_a_directory(tmp_path: Path, sqlite_url: str) -> None:
    (tmp_path / "d").mkdir()
    env = clean_env(FUSILLADE_DATABASE_URL=sqlite_url, FUSILLADE_UPSTREAM_URL="http://127.0.0.1:9")
    res = cli(["submit", "d"], env, tmp_path)
    assert res.returncode == 2, res.stderr
    (message,) = res.stderr.strip().splitlines()
    assert message.startswith(ERROR_PREFIX) and "is a directory" in message
    assert res.stdout == ""


@pytest.mark.parametrize("window", ["0h", "0s"])
def test_a_zero_completion_window_is_refused(tmp_path: Path, sqlite_url: str, window: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [line("a")])
    env = clean_env(FUSILLADE_DATABASE_URL=sqlite_url, FUSILLADE_UPSTREAM_URL="http://127.0.0.1:9")
    res = cli(["submit", str(src), "--completion-window", window], env, tmp_path)
    assert res.returncode == 2, res.stderr
    (message,) = res.stderr.strip().splitlines()
    assert message.startswith(ERROR_PREFIX) and "completion_window" in message
    assert res.stdout == ""
    assert Client(Settings().replace(database_url=sqlite_url)).list_batches() == []


def test_a_text_stream_that_is_not_utf8_is_refused_naming_the_line(
    tmp_path: Path, sqlite_url: str
) -> None:
    path = tmp_path / "utf16.jsonl"
    path.write_bytes(b"\xff\xfe")
    client = Client(Settings().replace(database_url=sqlite_url, upstream_url="http://127.0.0.1:9"))
    with open(path, encoding="utf-8") as fh, pytest.raises(InputError) as err:
        client.submit_batch(fh)
    assert err.value.line == 1
    assert "line 1" in str(err.value) and "UTF-8" in str(err.value)
    assert client.list_batches() == []


# ------------------------------------------------------------- settings, --version, list


def test_settings_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    """``settings | head -5`` shows the first rows; ``settings | true`` (the reader gone
    before the first write) still ends with status 0 and nothing on stderr."""
    env = clean_env(FUSILLADE_MODEL_LIMITS="a=3")
    for reader, rows in (("head -5", 5), ("true", 0)):
        res = subprocess.run(
            ["bash", "-c", f'"$0" settings | {reader}; exit "${{PIPESTATUS[0]}}"', CONSOLE_SCRIPT],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, (reader, res.stderr)
        assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
        assert res.stderr == "", (reader, res.stderr)
        shown = res.stdout.splitlines()
        assert len(shown) == rows
        if rows:
            assert shown[0].startswith("FUSILLADE_DATABASE_URL ")


def test_settings_shows_values_in_effect_masks_secrets_and_warns_on_typos(
    tmp_path: Path,
) -> None:
    env = clean_env(
        FUSILLADE_MODEL_LIMITS="a=3",
        FUSILLADE_UPSTREAM_API_KEY="sk-secret-xyz",
        FUSILLADE_BATCH_API_KEY="sk-batch-secret-abc",
        FUSILLADE_MODEL_LIMIT="4",
    )
    res = subprocess.run(
        [CONSOLE_SCRIPT, "settings"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    rows = {x.split()[0]: x.split() for x in res.stdout.splitlines()}
    assert rows["FUSILLADE_MODEL_LIMITS"][1:3] == ["a=3", "env"]
    assert rows["FUSILLADE_UPSTREAM_API_KEY"][1:3] == ["***", "env"]
    assert rows["FUSILLADE_BATCH_API_KEY"][1:3] == ["***", "env"]
    assert rows["FUSILLADE_COMPLETION_WINDOW"][1:3] == ["24h", "default"]
    assert rows["FUSILLADE_DEFAULT_MODEL_LIMIT"][1:3] == ["10", "default"]
    everything = res.stdout + res.stderr
    assert "sk-secret-xyz" not in everything and "sk-batch-secret-abc" not in everything
    assert "FUSILLADE_MODEL_LIMIT " not in res.stdout  # the typo is not a setting
    (warning,) = res.stderr.strip().splitlines()
    assert "FUSILLADE_MODEL_LIMIT" in warning
    assert "did you mean FUSILLADE_MODEL_LIMITS" in warning


def test_version(tmp_path: Path) -> None:
    res = cli(["--version"], clean_env(), tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"fusillade-celery {version('fusillade-celery')}"


def test_list_shows_batches_newest_first(tmp_path: Path, sqlite_url: str) -> None:
    client = Client(Settings().replace(database_url=sqlite_url, upstream_url="http://127.0.0.1:9"))
    first = client.submit_batch([line("a"), line("b")])
    second = client.submit_batch([line("c")])
    env = clean_env(FUSILLADE_DATABASE_URL=sqlite_url)

    res = cli(["list"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    shown = res.stdout.splitlines()
    assert [x.split()[0] for x in shown] == [second, first]
    assert "validating" in shown[0] and "0/1 completed" in shown[0]
    assert "0/2 completed" in shown[1]

    res = cli(["list", "--json"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    batches = [json.loads(x) for x in res.stdout.splitlines()]
    assert [b["id"] for b in batches] == [second, first]
    assert [b["request_counts"]["total"] for b in batches] == [1, 2]
    assert all(b["object"] == "batch" for b in batches)

    res = cli(["list", "--limit", "1"], env, tmp_path)
    assert [x.split()[0] for x in res.stdout.splitlines()] == [second]


# ------------------------------------------------------------- run


def run_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    return clean_env(FUSILLADE_DATABASE_URL=f"sqlite:///{tmp_path / 'run.sqlite3'}", **settings)


def test_run_of_a_file_whose_requests_all_fail_exits_3_saying_why(
    tmp_path: Path, mock: MockUpstream
) -> None:
    src = write_jsonl(
        tmp_path / "bad.jsonl", [line(f"r{i}", mock_statuses=[400]) for i in range(3)]
    )
    res = cli(["run", "-q", str(src)], run_env(tmp_path, FUSILLADE_UPSTREAM_URL=mock.url), tmp_path)
    assert res.returncode == 3, res.stderr
    assert any("ended failed" in x for x in res.stderr.splitlines()), res.stderr
    assert "Traceback" not in res.stderr
    assert "failed: 0 completed, 3 failed" in res.stdout
    assert len((tmp_path / "bad.errors.jsonl").read_text().splitlines()) == 3
    assert mock.state.calls == 3  # a 400 is not retried


def test_run_of_a_good_file_exits_0(tmp_path: Path, mock: MockUpstream) -> None:
    src = write_jsonl(tmp_path / "good.jsonl", [line(f"r{i}") for i in range(3)])
    res = cli(["run", "-q", str(src)], run_env(tmp_path, FUSILLADE_UPSTREAM_URL=mock.url), tmp_path)
    assert res.returncode == 0, res.stderr
    assert "completed: 3 completed, 0 failed" in res.stdout
    assert len((tmp_path / "good.output.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "good.errors.jsonl").read_text() == ""


def test_run_reads_the_api_key_from_standard_input(tmp_path: Path, mock: MockUpstream) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [line(f"r{i}") for i in range(3)])
    res = cli(
        ["run", "-q", str(src), "--upstream", mock.url, "--api-key", "-"],
        run_env(tmp_path),
        tmp_path,
        stdin="sk-from-stdin\n",
    )
    assert res.returncode == 0, res.stderr
    assert mock_authorizations(mock) == ["Bearer sk-from-stdin"] * 3
    assert "sk-from-stdin" not in res.stdout + res.stderr


@pytest.mark.parametrize("sealed", [False, True], ids=["in-clear", "sealed"])
@pytest.mark.parametrize("via", ["--upstream", "route"])
def test_run_sends_the_batch_api_key_from_the_environment(
    tmp_path: Path, mock: MockUpstream, via: str, sealed: bool
) -> None:
    """FUSILLADE_BATCH_API_KEY without --api-key: that key is what the upstream sees, the
    batch's upstream given by --upstream or by the default route (whose own key it overrides),
    with the key stored in clear or sealed (FUSILLADE_SECRET_KEY)."""
    src = write_jsonl(tmp_path / "in.jsonl", [line(f"r{i}") for i in range(2)])
    settings = {"FUSILLADE_BATCH_API_KEY": "sk-batch-env"}
    if sealed:
        settings["FUSILLADE_SECRET_KEY"] = SECRET_KEY
    args = ["run", "-q", str(src)]
    if via == "--upstream":
        args += ["--upstream", mock.url]
    else:
        settings |= {"FUSILLADE_UPSTREAM_URL": mock.url, "FUSILLADE_UPSTREAM_API_KEY": "sk-route"}
    res = cli(args, run_env(tmp_path, **settings), tmp_path)
    assert res.returncode == 0, res.stderr
    assert mock_authorizations(mock) == ["Bearer sk-batch-env"] * 2
    assert "sk-batch-env" not in res.stdout + res.stderr


# ------------------------------------------------------------- wait_batch


def test_wait_batch_times_out_then_returns_the_finished_batch(
    sqlite_url: str, mock: MockUpstream
) -> None:
    settings = Settings().replace(database_url=sqlite_url, upstream_url=mock.url)
    client = Client(settings)
    batch_id = client.submit_batch([line("a"), line("b")])
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=batch_id):
        client.wait_batch(batch_id, timeout=0.2)
    assert time.monotonic() - started < 2.0
    run_batch(client, batch_id)
    started = time.monotonic()
    batch = client.wait_batch(batch_id, timeout=5)
    assert time.monotonic() - started < 2.0
    assert batch["id"] == batch_id and batch["object"] == "batch"
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
