"""Alembic environment: the URL comes from `serving.db.migrate`, never from a file or the env.

Async URLs (asyncpg, aiosqlite) run the migrations through `connection.run_sync`; a caller may
also hand over an open sync connection in `config.attributes["connection"]`.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, make_url, pool
from sqlalchemy.ext.asyncio import create_async_engine

from serving.db.compat import lock_for_migration, record_compatibility
from serving.db.models import Base

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: run migrations through serving.db.migrate")
    return str(url)


def _configure(connection: Connection | None = None, **kwargs: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=(connection is not None and connection.dialect.name == "sqlite"),
        **kwargs,  # type: ignore[arg-type]
    )


def _run_with(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        lock_for_migration(connection)  # init containers of several pods may migrate at once
        context.run_migrations()
        record_compatibility(connection, context.script)


async def _run_async(url: str) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_with)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade --sql`) without touching a database."""
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        _run_with(given)
        return
    url = _database_url()
    if make_url(url).get_dialect().is_async:
        # serving.db.migrate guarantees no event loop runs in this thread.
        asyncio.run(_run_async(url))
        return
    from sqlalchemy import create_engine

    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as connection:
            _run_with(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
