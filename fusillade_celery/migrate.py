"""Alembic, driven from code: ``fusillade-celery migrate`` and the schema check on start-up."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from .db import SchemaError, is_sqlite


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "fusillade_celery:migrations")
    cfg.attributes["engine"] = engine
    return cfg


def head_revision(engine: Engine) -> str:
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    command.downgrade(alembic_config(engine), revision)


def ensure_schema(engine: Engine) -> None:
    """SQLite files are migrated on first use (embedded mode has no operator to do it);
    a server database must be migrated explicitly, and we say so instead of failing on SQL."""
    if current_revision(engine) == head_revision(engine):
        return
    if is_sqlite(str(engine.url)):
        upgrade(engine)
        return
    raise SchemaError(
        "the database is not migrated to this version: run `fusillade-celery migrate`"
    )
