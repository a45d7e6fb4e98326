"""Statements that set up a PostgreSQL server for Loquetier, run through ``psql`` before any
SQLAlchemy engine can connect (the embedded server of ``loquetier up``)."""

from __future__ import annotations


def database_exists_sql(database: str) -> str:
    """Prints ``1`` when ``database`` exists."""
    return f"SELECT 1 FROM pg_database WHERE datname = '{database}'"


def create_database_sql(database: str) -> str:
    return f'CREATE DATABASE "{database}"'
