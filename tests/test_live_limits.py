"""Limits and escalations changed while the engine runs: the claimer uses the value set in the
database over the environment's, ``unset`` restores the environment's, 0 pauses a model, and
a bad value changes nothing (Python API and ``fusillade-celery limits`` / ``escalations``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusillade_celery import claimer, limits, live
from fusillade_celery.embedded import TICK_S
from fusillade_celery.limits import LimitError
from fusillade_celery.mock_upstream import MockConfig, MockUpstream
from fusillade_celery.settings import Escalation, Settings
from fusillade_celery.submit import Client

from .conftest import line
from .live_checks import change_down_and_up
from .test_execute import Recorder

CLI = [sys.executable, "-m", "fusillade_celery.cli"]


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    live.forget()


def claimed(client: Client, settings: Settings) -> dict[str, int]:
    rec = Recorder()
    claimer.claim_all(client.store, settings, rec.publish)
    out: dict[str, int] = {}
    for routed, _, ids in rec.messages:
        out[routed] = out.get(routed, 0) + len(ids)
    return out


def test_the_claimer_uses_the_limit_set_and_unset_restores_the_environment_s(
    client: Client, settings: Settings
) -> None:
    env = settings.replace(model_limits={"m1": 2})
    client.submit_batch([line(f"r{i}") for i in range(20)])
    assert claimed(client, env) == {"m1": 2}
    limits.set_limits({"m1": 5}, client)
    assert claimed(client, env) == {"m1": 3}  # raised: the new slots fill at once
    limits.set_limits({"m1": 0}, client)
    assert claimed(client, env) == {}  # paused: nothing new, the 5 in flight go on
    assert limits.unset_limits(["m1"], client) == 1
    limits.set_limits({"other": 1}, client)
    assert claimed(client, env.replace(model_limits={"m1": 9})) == {"m1": 4}
    assert live.current(client.store, env).limit_source("m1") == live.SOURCE_ENV
    assert live.current(client.store, env).limit_source("other") == live.SOURCE_SET
    assert live.current(client.store, env).limit_source("m3") == live.SOURCE_DEFAULT


def test_escalations_set_and_switched_off_live(client: Client, settings: Settings) -> None:
    urgent = settings.replace(escalations={"m1": Escalation("m1-env", 3600)})
    client.submit_batch([line(f"u{i}") for i in range(3)], completion_window="30m")
    limits.set_escalations({"m1": "m1-fast:7200"}, client)
    limits.set_limits({"m1-fast": 1}, client)
    assert claimed(client, urgent) == {"m1-fast": 1, "m1": 2}
    client.submit_batch([line("v")], completion_window="30m")
    limits.set_escalations({"m1": "off"}, client)  # over the environment's escalation too
    assert claimed(client, urgent) == {"m1": 1}
    assert limits.unset_escalations(["m1"], client) == 1
    assert live.current(client.store, urgent).escalations == {"m1": Escalation("m1-env", 3600)}
    assert limits.escalations_table(client) == []  # the client's environment has none


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["gpt-4=-1"], "'gpt-4=-1': a limit is a whole number >= 0 (0 pauses the model)"),
        (["gpt-4=1.5"], "'gpt-4=1.5': a limit is a whole number >= 0"),
        (["gpt-4"], "'gpt-4': expected model=N (a whole number >= 0)"),
        (["=3"], "'=3': a model name is 1-256 printable characters"),
        ([], "give at least one model=N"),
    ],
)
def test_bad_limits_are_refused_naming_the_pair(pairs: list[str], message: str) -> None:
    with pytest.raises(LimitError) as err:
        limits.parse_limits(pairs)
    assert str(err.value) == message


def test_bad_escalations_are_refused(client: Client) -> None:
    for pair in ("gpt-4=fast:0", "gpt-4=fast:soon", "gpt-4=:60"):
        with pytest.raises(LimitError):
            limits.parse_escalations([pair])
    with pytest.raises(LimitError, match="cannot escalate to itself"):
        limits.set_escalations({"m1": "m1:60"}, client)
    with pytest.raises(LimitError):
        limits.set_limits({"m1": True}, client)  # type: ignore[dict-item]
    assert limits.escalations_table(client) == []
    assert client.store.stored_config().limits == {}


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_the_commands_set_show_and_refuse_with_one_line(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSILLADE_")}
    env["FUSILLADE_DATABASE_URL"] = f"sqlite:///{tmp_path / 'live.sqlite3'}"
    env["FUSILLADE_MODEL_LIMITS"] = "small=4"
    out = run_cli(["limits", "set", "gpt-4=16", "small=2"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    rows = json.loads(run_cli(["limits", "--json"], env, tmp_path).stdout)
    assert [(r["model"], r["limit"], r["source"]) for r in rows] == [
        ("gpt-4", 16, "set"),
        ("small", 2, "set"),
    ]
    bad = run_cli(["limits", "set", "gpt-4=8", "small=-3"], env, tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "fusillade-celery: error: limits: 'small=-3': a limit is a whole number >= 0 "
        "(0 pauses the model); nothing was changed"
    ]
    assert run_cli(["limits", "unset", "small"], env, tmp_path).returncode == 0
    shown = run_cli(["limits"], env, tmp_path).stdout.splitlines()
    assert shown[0].split()[:3] == ["MODEL", "LIMIT", "FROM"]
    assert [ln.split()[:3] for ln in shown[1:]] == [["gpt-4", "16", "set"], ["small", "4", "env"]]
    out = run_cli(["escalations", "set", "gpt-4=gpt-4-urgent:600"], env, tmp_path)
    assert out.stdout.splitlines()[1].split() == ["gpt-4", "gpt-4-urgent", "600", "set"]
    bad = run_cli(["escalations", "set", "gpt-4=x:-1"], env, tmp_path)
    assert bad.returncode == 2 and "nothing was changed" in bad.stderr


def test_an_embedded_run_follows_limits_set_while_it_runs(tmp_path: Path) -> None:
    """``fusillade-celery run`` on the SQLite file, ``limits set`` from another process on
    the same file: the upstream sees the in-flight count drain to the lowered limit and fill
    back when it is raised, with nothing restarted and every request completed."""
    import os

    with MockUpstream(MockConfig()) as mock:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FUSILLADE_")}
        env["FUSILLADE_DATABASE_URL"] = f"sqlite:///{tmp_path / 'run.sqlite3'}"
        env["FUSILLADE_UPSTREAM_URL"] = mock.url
        env["FUSILLADE_MODEL_LIMITS"] = "m1=6"
        source = tmp_path / "in.jsonl"
        source.write_text(
            "".join(json.dumps(line(f"r{i}", mock_latency_ms=200)) + "\n" for i in range(150))
        )
        run = subprocess.Popen(
            [*CLI, "run", str(source)], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
        )
        try:
            seen = change_down_and_up(
                lambda n: check(run_cli(["limits", "set", f"m1={n}"], env, tmp_path)),
                lambda: mock.state.in_flight["m1"],
                low=2,
                high=6,
                latency_s=0.2,
                # two of the run's claim ticks, the cache, one request's latency, the
                # command's own start-up (about 1 s on this machine), and slack
                bound_s=2 * TICK_S + live.CACHE_MAX_S + 0.2 + 1.0 + 3.0,
            )
            assert seen.peak_while_low <= 2, seen
            _, err = run.communicate(timeout=120)
        finally:
            run.kill()
        assert run.returncode == 0, err
        out = [json.loads(x) for x in (tmp_path / "in.output.jsonl").read_text().splitlines()]
        assert len(out) == 150 and {o["response"]["status_code"] for o in out} == {200}
        assert mock.state.peak["m1"] == 6
        print(f"embedded: drained to 2 in {seen.down_s:.2f}s, filled to 6 in {seen.up_s:.2f}s")


def check(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
