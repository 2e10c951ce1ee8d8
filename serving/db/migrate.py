"""Schema migrations: `svd-serve migrate` upgrades, the service refuses to start on an old schema.

Alembic's config is built here in code (no alembic.ini to find), and the URL is handed to
`serving/migrations/env.py` programmatically.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from serving.db.engine import async_database_url
from serving.db.errors import DatabaseNotMigrated

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

T = TypeVar("T")


def alembic_config(database_url: str | None = None) -> Config:
    """Alembic config pointing at `serving/migrations`, carrying `database_url` if given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Kept out of the ini options: ConfigParser would choke on '%' in passwords.
    config.attributes["database_url"] = database_url
    return config


def head_revision() -> str:
    """The revision this code needs."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # only possible with an empty versions/ directory
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database to `revision` (default: head); creates a SQLite file's directory.

    Blocking. Safe to call from inside a running event loop too (it then runs in a thread).
    """
    database_url = async_database_url(database_url)
    _ensure_sqlite_dir(database_url)
    _outside_event_loop(lambda: command.upgrade(alembic_config(database_url), revision))


def current_revision(database_url: str) -> str | None:
    """The revision the database is at, None for an empty (never migrated) database. Blocking."""
    return _outside_event_loop(lambda: asyncio.run(_current_revision_of_url(database_url)))


async def check_migrated(engine_or_url: AsyncEngine | str) -> None:
    """Raise `DatabaseNotMigrated` unless the database is at this code's head revision."""
    if isinstance(engine_or_url, AsyncEngine):
        current = await _current_revision_of_engine(engine_or_url)
    else:
        current = await _current_revision_of_url(engine_or_url)
    head = head_revision()
    if current == head:
        return
    where = "empty (no migrations applied)" if current is None else f"at revision {current}"
    raise DatabaseNotMigrated(
        f"The database is {where} while this code needs revision {head}; "
        "run `svd-serve migrate` to upgrade it."
    )


# Helpers -------------------------------------------------------------------------------------


def _revision_of(connection: Connection) -> str | None:
    heads = MigrationContext.configure(connection).get_current_heads()
    # We keep one linear history, so several heads can only mean a foreign schema.
    return ",".join(sorted(heads)) if heads else None


async def _current_revision_of_engine(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(_revision_of)


async def _current_revision_of_url(database_url: str) -> str | None:
    database_url = async_database_url(database_url)
    if _sqlite_file_missing(database_url):
        return None  # do not create an empty file just to look at it
    engine = create_async_engine(database_url)
    try:
        return await _current_revision_of_engine(engine)
    finally:
        await engine.dispose()


def _sqlite_path(database_url: str) -> Path | None:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.database.startswith("file:"):  # URI filenames: leave them to SQLite
        return None
    return Path(url.database)


def _sqlite_file_missing(database_url: str) -> bool:
    path = _sqlite_path(database_url)
    return path is not None and not path.exists()


def _ensure_sqlite_dir(database_url: str) -> None:
    path = _sqlite_path(database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def _outside_event_loop(fn: Callable[[], T]) -> T:
    """Run `fn` here, or in a helper thread if this thread runs an event loop.

    env.py and `current_revision` use `asyncio.run`, which refuses to nest in a running loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="svd-serve-migrate")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
