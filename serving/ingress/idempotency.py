"""Idempotency-Key semantics (issue #5): scoped to the owner, kept `idempotency_ttl_s`.

- A repeat with the same body answers with the job of the first request (200).
- The same key with a different body is refused: 422 `idempotency_key_reused`.
- A repeat while the first request is still being accepted: 409 `idempotency_key_in_flight`.

The jobs row keeps the key and the request's fingerprint (the system of record); a short-lived
Redis marker (`Keys.idempotency_lock`) covers the window before that row exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import structlog
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from serving.db.jobs import JobRecord, JobRepository
from serving.errors import Conflict, InvalidInput
from serving.ingress.schemas import AnimateOptions
from serving.keys import Keys

log = structlog.get_logger(__name__)

# The in-flight marker's lease: renewed every third of it while the request is accepted, deleted
# when it ends. An ingress that dies holding it blocks the key (409) for at most this long.
IN_FLIGHT_TTL_S = 10.0


def request_fingerprint(image_bytes: bytes, options: AnimateOptions) -> str:
    """SHA-256 over the image bytes and every option as sent: "the same body"."""
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(image_bytes).digest())
    digest.update(json.dumps(options.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


class IdempotencyGuard:
    """Looks up and reserves an owner's Idempotency-Key around one submission."""

    def __init__(self, jobs: JobRepository, redis: aioredis.Redis, keys: Keys, ttl_s: int,
                 in_flight_ttl_s: float = IN_FLIGHT_TTL_S) -> None:
        self._jobs = jobs
        self._redis = redis
        self._keys = keys
        self._ttl = dt.timedelta(seconds=ttl_s)
        self._in_flight_ttl_s = in_flight_ttl_s

    async def existing(self, owner_id: str, key: str, fingerprint: str) -> JobRecord | None:
        """The job an earlier request with `key` made, if it is still within its retention;
        raises `InvalidInput` when that request had another body."""
        record = await self._jobs.find_by_idempotency_key(owner_id, key)
        if record is None:
            return None
        if dt.datetime.now(dt.timezone.utc) - record.created_at > self._ttl:
            # Past retention the key is free again; the old job keeps everything but the key.
            await self._jobs.release_idempotency_key(record.id)
            return None
        self.check_same_body(record, key, fingerprint)
        return record

    @staticmethod
    def check_same_body(record: JobRecord, key: str, fingerprint: str) -> None:
        # Rows from before fingerprints were stored (NULL) are taken at their word.
        if record.idempotency_fingerprint not in (None, fingerprint):
            raise InvalidInput(
                f"Idempotency-Key {key!r} was already used for a request with a different body.",
                code="idempotency_key_reused",
            )

    @asynccontextmanager
    async def in_flight(self, owner_id: str, key: str) -> AsyncIterator[None]:
        """Hold the key while this request is accepted; 409 when another request holds it.

        redis-py's Lock gives the marker a token of its own, so that a holder whose lease lapsed
        can neither renew nor delete a marker another request took since."""
        lock = self._redis.lock(self._keys.idempotency_lock(owner_id, key), timeout=self._in_flight_ttl_s,
                                blocking=False)
        if not await lock.acquire():
            raise Conflict(
                f"A request with Idempotency-Key {key!r} is still being processed; retry shortly.",
                code="idempotency_key_in_flight",
            )
        renewal = asyncio.create_task(self._renew(lock), name="idempotency-renewal")
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            with contextlib.suppress(LockError):  # lapsed: the jobs row's unique key still guards
                await lock.release()

    async def _renew(self, lock: Lock) -> None:
        try:
            while True:
                await asyncio.sleep(self._in_flight_ttl_s / 3)
                await lock.reacquire()
        except LockError as exc:
            log.warning("idempotency_marker_lost", error=repr(exc))
