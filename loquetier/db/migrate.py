"""Run Alembic programmatically: ``upgrade(url)`` / ``downgrade(url)`` (and async twins).

The migration scripts ship inside the package as ``loquetier.migrations`` (the repo's
``migrations/`` folder), so this works from a checkout and from an installed wheel.
"""

from __future__ import annotations

import asyncio
from importlib.resources import files
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from loquetier.db.session import create_engine


def migrations_dir() -> Path:
    return Path(str(files("loquetier.migrations")))


def alembic_config(url: str | None = None) -> Config:
    """The packaged alembic.ini with ``script_location`` pointing at the packaged scripts."""
    cfg = Config(str(migrations_dir() / "alembic.ini"))
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        cfg.attributes["url"] = url  # attributes, not the ini: '%' in passwords stays literal
    return cfg


async def _with_connection(url: str, action: Any) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(action)
    finally:
        await engine.dispose()


async def upgrade_async(url: str, revision: str = "head") -> None:
    def run(connection: Connection) -> None:
        cfg = alembic_config(url)
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)

    await _with_connection(url, run)


async def downgrade_async(url: str, revision: str = "base") -> None:
    def run(connection: Connection) -> None:
        cfg = alembic_config(url)
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, revision)

    await _with_connection(url, run)


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (blocking; no running loop)."""
    asyncio.run(upgrade_async(url, revision))


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database at ``url`` down to ``revision`` (blocking; no running loop)."""
    asyncio.run(downgrade_async(url, revision))


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def current_revision(url: str) -> str | None:
    found: list[str | None] = []

    def run(connection: Connection) -> None:
        found.append(MigrationContext.configure(connection).get_current_revision())

    await _with_connection(url, run)
    return found[0]


__all__ = [
    "alembic_config",
    "current_revision",
    "downgrade",
    "downgrade_async",
    "head_revision",
    "migrations_dir",
    "upgrade",
    "upgrade_async",
]
