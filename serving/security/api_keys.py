"""API keys: random, shown once, stored as a SHA-256 hash, found by a prefix, scoped, revocable.

A key looks like `svd_<prefix>_<secret>`: `prefix` is 12 hex characters stored in clear to find
the row, `secret` carries 256 random bits. A plain SHA-256 suffices for keys with that much
entropy (no dictionary to attack, unlike passwords); the comparison is constant-time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from sqlalchemy import RowMapping, Table, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from serving.db.models import ApiKey
from serving.errors import InvalidInput, NotFound
from serving.security.scopes import Scope, format_scopes, parse_scopes

api_keys = cast(Table, ApiKey.__table__)

KEY_SCHEME = "svd"
PREFIX_HEX_CHARS = 12
MAX_OWNER_LENGTH = 128


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and its lookup prefix."""
    prefix = secrets.token_hex(PREFIX_HEX_CHARS // 2)
    return f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}", prefix


def key_prefix(key: str) -> str | None:
    """The lookup prefix of a key in our format, None for anything else."""
    scheme, sep, rest = key.partition("_")
    prefix, sep2, secret = rest.partition("_")
    if scheme != KEY_SCHEME or not sep or not sep2 or not secret or len(prefix) != PREFIX_HEX_CHARS:
        return None
    return prefix if all(c in "0123456789abcdef" for c in prefix) else None


@dataclass(frozen=True)
class ApiKeyRecord:
    """One stored key, without anything that could rebuild it."""

    id: str
    prefix: str
    owner_id: str
    scopes: frozenset[Scope]
    name: str | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class ApiKeyRepository:
    """Async access to the `api_keys` table, one short transaction per call."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def create(
        self, owner_id: str, scopes: Iterable[Scope | str], *, name: str | None = None
    ) -> tuple[ApiKeyRecord, str]:
        """Store a new key and return it with its plaintext, which is never available again."""
        owner_id = owner_id.strip()
        if not owner_id or len(owner_id) > MAX_OWNER_LENGTH:
            raise InvalidInput(f"The owner must be 1 to {MAX_OWNER_LENGTH} characters.", code="invalid_owner")
        parsed = parse_scopes([s.value if isinstance(s, Scope) else s for s in scopes])
        key, prefix = new_key()
        values = {
            "id": str(uuid.uuid4()),
            "prefix": prefix,
            "key_hash": hash_key(key),
            "owner_id": owner_id,
            "scopes": format_scopes(parsed),
            "name": name,
            "created_at": dt.datetime.now(dt.timezone.utc),
            "revoked_at": None,
        }
        async with self._sessions() as session, session.begin():
            row = (await session.execute(insert(api_keys).values(values).returning(api_keys))).mappings().one()
        return _record(row), key

    async def authenticate(self, key: str) -> ApiKeyRecord | None:
        """The active key record for `key`, or None (unknown format, unknown, wrong or revoked)."""
        prefix = key_prefix(key)
        if prefix is None:
            return None
        async with self._sessions() as session:
            row = (await session.execute(select(api_keys).where(api_keys.c.prefix == prefix))).mappings().first()
        if row is None or not hmac.compare_digest(row["key_hash"], hash_key(key)):
            return None
        record = _record(row)
        return record if record.active else None

    async def any_active(self) -> bool:
        """Whether at least one key is not revoked."""
        async with self._sessions() as session:
            found = await session.execute(select(api_keys.c.id).where(api_keys.c.revoked_at.is_(None)).limit(1))
            return found.first() is not None

    async def list_keys(self, owner_id: str | None = None, *, include_revoked: bool = False) -> list[ApiKeyRecord]:
        stmt = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if owner_id is not None:
            stmt = stmt.where(api_keys.c.owner_id == owner_id)
        if not include_revoked:
            stmt = stmt.where(api_keys.c.revoked_at.is_(None))
        async with self._sessions() as session:
            rows = (await session.execute(stmt)).mappings().all()
        return [_record(row) for row in rows]

    async def revoke(self, key_id_or_prefix: str) -> ApiKeyRecord:
        """Revoke by id or prefix (what `keys list` shows); revoking twice is harmless."""
        ident = key_id_or_prefix.strip()
        try:
            as_id: str | None = str(uuid.UUID(ident))
        except ValueError:
            as_id = None
        match = api_keys.c.prefix == ident if as_id is None else or_(api_keys.c.id == as_id, api_keys.c.prefix == ident)
        now = dt.datetime.now(dt.timezone.utc)
        async with self._sessions() as session, session.begin():
            await session.execute(update(api_keys).where(match, api_keys.c.revoked_at.is_(None)).values(revoked_at=now))
            row = (await session.execute(select(api_keys).where(match))).mappings().first()
        if row is None:
            raise NotFound(f"No API key {ident!r}.", code="unknown_api_key")
        return _record(row)


def _record(row: RowMapping) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=str(row["id"]),
        prefix=row["prefix"],
        owner_id=row["owner_id"],
        scopes=parse_scopes(row["scopes"]),
        name=row["name"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )
