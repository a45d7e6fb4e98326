"""Async engine and session factory (asyncpg), and what callers outside ``loquetier.db`` need
of SQLAlchemy without importing it: the session type, the error type, URL parsing."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from loquetier.settings import DatabaseSettings, get_settings

Session = AsyncSession  # what repo functions take: one transaction's session
DatabaseError = SQLAlchemyError  # any error the database layer raises


def server_address(url: str) -> tuple[str, int]:
    """(host, port) of a database URL (defaults 127.0.0.1:5432); ValueError if it is not a URL."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"not a database URL: {url!r}") from None
    return parsed.host or "127.0.0.1", parsed.port or 5432


def libpq_url(url: str) -> str:
    """The ``postgresql://`` form of a database URL, for psql and other libpq clients."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def async_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` / ``postgresql+psycopg://`` -> ``postgresql+asyncpg://``."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"only PostgreSQL is supported, got {parsed.get_backend_name()!r}")
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def create_engine(url: str | None = None, settings: DatabaseSettings | None = None) -> AsyncEngine:
    """An AsyncEngine for ``url`` (default: ``LOQUETIER_DATABASE__URL``)."""
    settings = settings or get_settings().database
    url = url or settings.url
    if url is None:
        raise ValueError("no database URL: set LOQUETIER_DATABASE__URL or start the embedded one")
    return create_async_engine(
        async_url(url),
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout_s,
        pool_pre_ping=True,
        echo=settings.echo,
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded rows usable after commit (``expire_on_commit=False``)."""
    return async_sessionmaker(engine, expire_on_commit=False)
