"""Alembic environment, async-capable.

Two ways in: ``loquetier.db.migrate`` hands over an open connection in
``config.attributes["connection"]``; the ``alembic`` CLI gets none, so this file opens an
async engine on ``config.attributes["url"]``, the ini's ``sqlalchemy.url`` or
``LOQUETIER_DATABASE__URL``.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from loquetier.db.models import Base
from loquetier.db.session import async_url, create_engine
from loquetier.settings import get_settings

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and not config.attributes.get("connection"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    url = url or get_settings().database.url
    if not url:
        raise RuntimeError("no database URL: set LOQUETIER_DATABASE__URL")
    return str(url)


def _configure(**kwargs: object) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kwargs)  # type: ignore[arg-type]


def do_run_migrations(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    _configure(url=async_url(_url()), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    do_run_migrations(connection)
else:
    asyncio.run(run_async_migrations())
