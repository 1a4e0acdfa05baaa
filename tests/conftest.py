"""Shared fixtures: real PostgreSQL, real Redis, the project's own mock upstream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fusillade_celery.app import configure
from fusillade_celery.db import dispose_all, get_engine, normalize_url
from fusillade_celery.migrate import upgrade
from fusillade_celery.mock_upstream import MockConfig, MockUpstream
from fusillade_celery.settings import Settings
from fusillade_celery.store import Store
from fusillade_celery.submit import Client

from . import services


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[str]:
    with services.postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def redis_base() -> Iterator[str]:
    with services.redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def pg_template(pg_admin: str) -> Iterator[str]:
    """A database migrated once; each test clones it (CREATE DATABASE ... TEMPLATE)."""
    name = services.create_database(pg_admin)
    engine = get_engine(normalize_url(services.with_db(pg_admin, name)))
    upgrade(engine)
    engine.dispose()
    dispose_all()
    yield name
    services.drop_database(pg_admin, name)


@pytest.fixture
def pg_url(pg_admin: str, pg_template: str) -> Iterator[str]:
    name = services.create_database(pg_admin, template=pg_template)
    yield normalize_url(services.with_db(pg_admin, name))
    dispose_all()
    services.drop_database(pg_admin, name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'state.sqlite3'}"
    dispose_all()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Both engines the project supports; store-level tests run on each."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
def mock() -> Iterator[MockUpstream]:
    with MockUpstream(MockConfig()) as m:
        yield m


@pytest.fixture
def settings(db_url: str, mock: MockUpstream) -> Settings:
    s = Settings().replace(
        database_url=db_url,
        broker_url="",
        upstream_url=mock.url,
        upstream_api_key="sk-test-secret-123",
        backoff_ms=50,
        max_backoff_ms=200,
        timeout_ms=2000,
    )
    configure(s)
    return s


@pytest.fixture
def client(settings: Settings) -> Client:
    return Client(settings)


@pytest.fixture
def store(client: Client) -> Store:
    return client.store


def line(
    custom_id: str, model: str = "m1", url: str = "/v1/chat/completions", **body: object
) -> dict:
    """One OpenAI batch input line."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], **body},
    }
