"""Helpers for job-store tests: throwaway databases on the real PostgreSQL and SQLite."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from tests.conftest import PG_ADMIN_DSN

BACKENDS = ("postgresql", "sqlite")


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """An empty PostgreSQL database (asyncpg URL), dropped on exit."""
    name = f"svd_db_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"
