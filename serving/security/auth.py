"""Who is calling: a bearer key from the database, a static bootstrap key from the settings, or
nobody at all when authentication is explicitly disabled (development only)."""

from __future__ import annotations

import hashlib
import hmac

from serving.errors import Unauthorized
from serving.security.api_keys import ApiKeyRepository
from serving.security.scopes import ALL_SCOPES, DEFAULT_SCOPES, Principal

LOCAL_OWNER = "local"


class Authenticator:
    """Turns an `Authorization` header into a `Principal`, or raises `Unauthorized` (401)."""

    def __init__(self, keys: ApiKeyRepository, static_keys: dict[str, str], *, disabled: bool = False) -> None:
        self._keys = keys
        # Static keys (SVD_SERVE_API_KEYS "owner:key") are kept only as digests, like stored keys.
        self._static = {hashlib.sha256(key.encode()).digest(): owner for key, owner in static_keys.items()}
        self.disabled = disabled

    async def authenticate(self, authorization: str | None) -> Principal:
        if self.disabled:
            return Principal(owner_id=LOCAL_OWNER, scopes=ALL_SCOPES, key_id=LOCAL_OWNER)
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Send `Authorization: Bearer <api key>`.", code="missing_api_key")
        if len(token) > 256:
            raise Unauthorized("The API key is not valid.", code="invalid_api_key")
        digest = hashlib.sha256(token.encode()).digest()
        for known, owner in self._static.items():
            if hmac.compare_digest(known, digest):
                return Principal(owner_id=owner, scopes=DEFAULT_SCOPES, key_id="static-" + digest.hex()[:16])
        record = await self._keys.authenticate(token)
        if record is None:
            # Unknown, malformed and revoked keys answer alike: nothing to learn by probing.
            raise Unauthorized("The API key is not valid.", code="invalid_api_key")
        return Principal(owner_id=record.owner_id, scopes=record.scopes, key_id=record.id)
