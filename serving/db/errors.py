"""Errors the job store raises on purpose (mapped to HTTP with the rest of `serving.errors`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from serving.errors import Conflict, SvdServeError

if TYPE_CHECKING:
    from serving.db.jobs import JobRecord


class DatabaseNotMigrated(SvdServeError):
    """The database schema is not the one this code was written for."""

    code = "database_not_migrated"
    status = 503


class DuplicateIdempotencyKey(Conflict):
    """Another job of the same owner already holds this idempotency key (a lost race)."""

    code = "idempotency_key_conflict"

    def __init__(self, message: str, *, existing: JobRecord) -> None:
        super().__init__(message)
        self.existing = existing
