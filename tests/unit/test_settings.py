"""Settings: every field from FUSILLADE_<NAME>, with errors that name the variable."""

from __future__ import annotations

import dataclasses

import pytest

from fusillade_celery.settings import ConfigError, Settings, env_help, parse_duration_s


def test_every_field_has_an_env_var_and_a_doc() -> None:
    names = {row[0] for row in env_help()}
    for f in dataclasses.fields(Settings):
        assert "FUSILLADE_" + f.name.upper() in names
        assert f.metadata["doc"]
    for required in (
        "FUSILLADE_DATABASE_URL",
        "FUSILLADE_BROKER_URL",
        "FUSILLADE_UPSTREAM_URL",
        "FUSILLADE_UPSTREAM_API_KEY",
        "FUSILLADE_MODEL_LIMITS",
        "FUSILLADE_DEFAULT_MODEL_LIMIT",
        "FUSILLADE_BACKOFF_MS",
        "FUSILLADE_MAX_BACKOFF_MS",
        "FUSILLADE_BACKOFF_FACTOR",
        "FUSILLADE_MAX_RETRIES",
        "FUSILLADE_STOP_BEFORE_DEADLINE_MS",
        "FUSILLADE_TIMEOUT_MS",
    ):
        assert required in names


def test_defaults_match_the_design_table() -> None:
    s = Settings.from_env({})
    assert s.database_url.startswith("sqlite:///")
    assert s.embedded
    assert (s.default_model_limit, s.claim_interval_ms, s.claim_batch_size) == (10, 1000, 100)
    assert (s.max_retries, s.stop_before_deadline_ms) == (1000, 0)
    assert (s.backoff_ms, s.backoff_factor, s.max_backoff_ms) == (1000, 2, 10000)
    assert (s.timeout_ms, s.claim_timeout_ms, s.processing_timeout_ms) == (600000, 60000, 600000)
    assert {500, 503, 599, 429, 408, 404} <= s.retry_statuses
    assert 400 not in s.retry_statuses
    assert s.batch_metadata_fields == ("id", "endpoint", "created_at", "completion_window")


def test_parses_structured_values() -> None:
    s = Settings.from_env(
        {
            "FUSILLADE_MODEL_LIMITS": "gpt-4=8, small=3",
            "FUSILLADE_RETRY_STATUSES": "5xx,429",
            "FUSILLADE_BROKER_URL": "redis://localhost:6379/0",
            "FUSILLADE_ESCALATIONS": "gpt-4=gpt-4-fast:600,small=big",
            "FUSILLADE_ROUTES": '{"gpt-4": {"url": "http://a/", "api_key_env": "MY_KEY"}}',
            "MY_KEY": "sk-abc",
            "FUSILLADE_BACKOFF_FACTOR": "1.5",
        }
    )
    assert s.model_limits == {"gpt-4": 8, "small": 3}
    assert s.limit_for("gpt-4") == 8 and s.limit_for("other") == 10
    assert 429 in s.retry_statuses and 404 not in s.retry_statuses
    assert not s.embedded
    assert (
        s.escalations["gpt-4"].model == "gpt-4-fast" and s.escalations["gpt-4"].threshold_s == 600
    )
    assert s.escalations["small"].threshold_s == 900
    route = s.route_for("gpt-4")
    assert route is not None and route.url == "http://a" and route.api_key == ""  # env not read
    assert s.backoff_factor == 1.5


def test_route_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-from-env")
    s = Settings.from_env(
        {"FUSILLADE_ROUTES": '{"m": {"url": "http://a", "api_key_env": "MY_KEY"}}'}
    )
    assert s.route_for("m").api_key == "sk-from-env"  # type: ignore[union-attr]
    assert s.route_for("unknown") is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FUSILLADE_MODEL_LIMITS", "gpt-4"),
        ("FUSILLADE_MODEL_LIMITS", "gpt-4=0"),
        ("FUSILLADE_MAX_RETRIES", "many"),
        ("FUSILLADE_ROUTES", "{not json"),
        ("FUSILLADE_RETRY_STATUSES", "5xx,abc"),
        ("FUSILLADE_DEFAULT_MODEL_LIMIT", "0"),  # would claim nothing, silently, for ever
        ("FUSILLADE_CLAIM_BATCH_SIZE", "0"),
        ("FUSILLADE_TIMEOUT_MS", "-1"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_repr_hides_secrets() -> None:
    s = Settings().replace(
        upstream_api_key="sk-very-secret",
        database_url="postgresql://u:hunter2@db/x",
        broker_url="redis://:pw123@r:6379/0",
    )
    text = repr(s)
    assert "sk-very-secret" not in text and "hunter2" not in text and "pw123" not in text


def test_durations() -> None:
    assert parse_duration_s("24h") == 86400
    assert parse_duration_s("90s") == 90
    assert parse_duration_s("2d") == 172800
    with pytest.raises(ValueError):
        parse_duration_s("tomorrow")
