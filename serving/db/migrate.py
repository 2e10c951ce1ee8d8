"""Schema migrations: `svd-serve migrate` upgrades; a process refuses a schema older than its
code, and a newer one unless that schema declares itself compatible (serving.db.compat).

Alembic's config is built here in code (no alembic.ini to find), and the URL is handed to
`serving/migrations/env.py` programmatically.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from serving.db.compat import known_revision, recorded_oldest
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
    head = _script().get_current_head()
    if head is None:  # only possible with an empty versions/ directory
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database to `revision` (default: head); creates a SQLite file's directory.

    A database a newer release migrated is left alone when it works with this code (an old pod
    restarting mid-release runs its migrate step too), refused with `DatabaseNotMigrated` if not.
    Blocking. Safe to call from inside a running event loop too (it then runs in a thread).
    """
    database_url = async_database_url(database_url)
    _ensure_sqlite_dir(database_url)
    current = current_revision(database_url)
    if current is not None and not known_revision(_script(), current):
        _outside_event_loop(lambda: asyncio.run(check_migrated(database_url)))
        return
    _outside_event_loop(lambda: command.upgrade(alembic_config(database_url), revision))


def current_revision(database_url: str) -> str | None:
    """The revision the database is at, None for an empty (never migrated) database. Blocking."""
    return _outside_event_loop(lambda: asyncio.run(_current_revision_of_url(database_url)))


async def check_migrated(engine_or_url: AsyncEngine | str) -> None:
    """Raise `DatabaseNotMigrated` unless this code can run on the database: it is at this code's
    head, or at a newer revision whose schema declares this code's head still compatible."""
    if isinstance(engine_or_url, AsyncEngine):
        current, oldest = await _revision_and_oldest_of_engine(engine_or_url)
    else:
        current, oldest = await _revision_and_oldest_of_url(engine_or_url)
    head = head_revision()
    if current == head:
        return
    script = _script()
    if current is None or known_revision(script, current):
        where = "empty (no migrations applied)" if current is None else f"at revision {current}"
        raise DatabaseNotMigrated(
            f"The database is {where} while this code needs revision {head}; "
            "run `svd-serve migrate` to upgrade it."
        )
    # A newer release migrated it: fine while the schema still serves code as old as ours.
    if oldest is not None and known_revision(script, oldest):
        return
    raise DatabaseNotMigrated(
        f"The database is at revision {current}, which a newer release applied and which needs code at "
        f"revision {oldest or current} or later; this code is at revision {head}: deploy the newer release."
    )


# Helpers -------------------------------------------------------------------------------------


@cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def _revision_of(connection: Connection) -> str | None:
    heads = MigrationContext.configure(connection).get_current_heads()
    # We keep one linear history, so several heads can only mean a foreign schema.
    return ",".join(sorted(heads)) if heads else None


def _revision_and_oldest(connection: Connection) -> tuple[str | None, str | None]:
    current = _revision_of(connection)
    return current, (recorded_oldest(connection) if current is not None else None)


async def _revision_and_oldest_of_engine(engine: AsyncEngine) -> tuple[str | None, str | None]:
    async with engine.connect() as connection:
        return await connection.run_sync(_revision_and_oldest)


async def _revision_and_oldest_of_url(database_url: str) -> tuple[str | None, str | None]:
    database_url = async_database_url(database_url)
    if _sqlite_file_missing(database_url):
        return None, None  # do not create an empty file just to look at it
    engine = create_async_engine(database_url)
    try:
        return await _revision_and_oldest_of_engine(engine)
    finally:
        await engine.dispose()


async def _current_revision_of_url(database_url: str) -> str | None:
    return (await _revision_and_oldest_of_url(database_url))[0]


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
