"""Which code may run on which schema: expand/contract migrations (docs/migrations.md).

Every migration module may declare `oldest_compatible_revision`: None for an expand step that
every older release survives (a new table, a nullable column, an index), or the oldest code
revision that still works after it (a contract step: a drop, a rename, a new constraint). A module
without the name is strict (only its own revision's code works), as the steps before 0007 are.

After each migration run the oldest revision that works with the whole history up to the
database's revision is written to `schema_compatibility`, in the same transaction; a process of an
older release, which does not know the newer steps, reads it there.
"""

from __future__ import annotations

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from typing import cast

from sqlalchemy import Connection, Table, delete, inspect, insert, select, text

from serving.db.models import SchemaCompatibility

COMPATIBILITY_ROW_ID = 1
# PostgreSQL advisory lock held by a migration run: pods that migrate at once take turns.
MIGRATION_LOCK_KEY = 0x5344_5F4D_4947  # "SD_MIG"


def known_revision(script: ScriptDirectory, revision: str) -> bool:
    """Whether this code ships `revision` (else a newer release wrote it)."""
    try:
        return script.get_revision(revision) is not None
    except CommandError:  # alembic's ResolutionError for an unknown id is a CommandError
        return False


def oldest_compatible(script: ScriptDirectory, revision: str) -> str:
    """The oldest code revision that works with a database at `revision`: the newest of the
    constraints declared by the steps up to it."""
    history = list(script.walk_revisions("base", revision))  # newest first
    position = {script_rev.revision: index for index, script_rev in enumerate(history)}
    oldest = history[-1].revision
    for step in history:
        declared = getattr(step.module, "oldest_compatible_revision", step.revision)
        if declared is not None and position[declared] < position[oldest]:
            oldest = declared
    return oldest


def lock_for_migration(connection: Connection) -> None:
    """Serialize migration runs on PostgreSQL (released with the transaction)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})


def record_compatibility(connection: Connection, script: ScriptDirectory) -> None:
    """Write the database's compatibility row for the revision it is at now."""
    heads = MigrationContext.configure(connection).get_current_heads()
    table = cast(Table, SchemaCompatibility.__table__)
    if len(heads) != 1 or not inspect(connection).has_table(table.name):
        return  # empty, or downgraded below 0007
    connection.execute(delete(table))
    connection.execute(
        insert(table).values(id=COMPATIBILITY_ROW_ID, oldest_code_revision=oldest_compatible(script, heads[0]))
    )


def recorded_oldest(connection: Connection) -> str | None:
    """The oldest compatible code revision the database declares, None without the row."""
    table = cast(Table, SchemaCompatibility.__table__)
    if not inspect(connection).has_table(table.name):
        return None
    return connection.execute(select(table.c.oldest_code_revision)).scalar_one_or_none()
