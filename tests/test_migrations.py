"""Alembic produces exactly the declared schema, and downgrades cleanly (both engines)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from fusillade_celery.db import get_engine
from fusillade_celery.migrate import (
    current_revision,
    downgrade,
    ensure_schema,
    head_revision,
    upgrade,
)
from fusillade_celery.schema import metadata

from . import services


def _diff(engine) -> list:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def test_migrations_match_declared_metadata_and_downgrade(pg_admin: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    name = services.create_database(pg_admin)
    try:
        for url in (
            f"sqlite:///{tmp_path / 'm.sqlite3'}",
            services.with_db(pg_admin, name).replace("postgresql://", "postgresql+psycopg://"),
        ):
            engine = get_engine(url)
            upgrade(engine)
            assert current_revision(engine) == head_revision(engine)
            assert _diff(engine) == [], f"schema drift on {engine.dialect.name}"
            indexes = {i["name"] for i in inspect(engine).get_indexes("requests")}
            assert {
                "ix_requests_pending",
                "ix_requests_in_flight",
                "ix_requests_batch_state",
            } <= indexes
            downgrade(engine)
            assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
            ensure_schema(engine) if engine.dialect.name == "sqlite" else upgrade(engine)
            assert _diff(engine) == []
            engine.dispose()
    finally:
        services.drop_database(pg_admin, name)


def test_unmigrated_server_database_gives_a_clear_error(pg_admin: str) -> None:
    import pytest

    from fusillade_celery.db import SchemaError

    name = services.create_database(pg_admin)
    try:
        engine = get_engine(
            services.with_db(pg_admin, name).replace("postgresql://", "postgresql+psycopg://")
        )
        with pytest.raises(SchemaError, match="fusillade-celery migrate"):
            ensure_schema(engine)
        engine.dispose()
    finally:
        services.drop_database(pg_admin, name)
