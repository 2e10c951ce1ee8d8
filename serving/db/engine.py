"""Async engine and session factory for the job store (PostgreSQL or a SQLite file)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, make_url
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from serving import strict_json

# How long a SQLite writer waits for another writer's lock before failing ("database is locked").
SQLITE_BUSY_TIMEOUT_MS = 10_000

_ASYNC_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


def async_database_url(url: str) -> str:
    """Give a driverless URL (`postgresql://`, `sqlite:///`) its async driver; others unchanged."""
    parsed = make_url(url)
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False) if driver else url


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An `AsyncEngine` tuned for its database; `kwargs` go to `create_async_engine`."""
    url = async_database_url(url)
    parsed = make_url(url)
    # JSON columns are written as strict JSON on both stores: SQLite would keep a NaN that
    # PostgreSQL's JSONB refuses (serving.strict_json).
    kwargs.setdefault("json_serializer", strict_json.dumps)
    if parsed.get_backend_name() != "sqlite":
        # Connections die behind load balancers and on failover; check before use.
        kwargs.setdefault("pool_pre_ping", True)
        return create_async_engine(url, **kwargs)

    in_memory = parsed.database in (None, "", ":memory:")
    if in_memory:
        # One shared connection, or every checkout would see its own empty database.
        kwargs.setdefault("poolclass", StaticPool)
    kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
    engine = create_async_engine(url, **kwargs)

    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                # Readers do not block the writer and vice versa (API polls while workers write).
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")  # durable enough under WAL
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    return engine


def make_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (we hand out snapshots anyway)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def rows_matched(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched (its result is a CursorResult)."""
    if not isinstance(result, CursorResult):
        raise TypeError(f"expected the result of an UPDATE or DELETE, got {type(result).__name__}")
    return result.rowcount
