"""Inbound provider webhooks: `POST /api/v1/provider/webhook/{provider}`.

Two ways to trust a callback, chosen per provider:

- **Signed** (Standard Webhooks): HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{raw body}`
  with the provider's `whsec_` secret(s), compared in constant time; a timestamp more than the
  tolerance (5 min) away from now is refused, so a captured call cannot be replayed later.
- **Per-job secret** for providers that sign nothing: the callback URL we gave the provider
  carries `?job=<id>&token=<HMAC of provider and job>`; the body is only a hint, so the
  provider's `ProviderTaskReader` re-reads the task from the provider before anything trusts it.

A delivery id (the `webhook-id`, or a digest of job and body) is processed once: the first call
claims it with SET NX (kept `INBOUND_DEDUPE_TTL_S`), a repeat answers 200 and changes nothing.
An unverifiable call raises `Unauthorized` (401) before anything is claimed or changed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import redis.asyncio as aioredis
import structlog
from pydantic import SecretStr
from standardwebhooks import Webhook

from serving import strict_json
from serving.errors import InvalidInput, NotFound, RetryableError, SvdServeError, Unauthorized
from serving.keys import Keys
from serving.webhooks.signing import parse_secrets

log = structlog.get_logger(__name__)

# Providers retry a delivery for a day or more, each time with a fresh timestamp, so a processed
# id must be remembered well beyond the timestamp tolerance.
INBOUND_DEDUPE_TTL_S: Final = 3 * 24 * 3600
CALLBACK_PATH: Final = "/api/v1/provider/webhook"


@dataclass(frozen=True)
class InboundEvent:
    """A verified provider callback, handed to the provider's handler."""

    provider: str
    delivery_id: str
    payload: dict[str, Any]  # signed: the body; per-job secret: what the provider re-read
    verified_by: Literal["signature", "job_secret"]
    job_id: str | None = None


ProviderHandler = Callable[[InboundEvent], Awaitable[None]]


class ProviderTaskReader(Protocol):
    """Re-reads a task from a provider that does not sign its callbacks (issue #6: Runway)."""

    async def read_task(self, job_id: str, claimed: Mapping[str, Any]) -> dict[str, Any]:
        """The task's state as the provider's API reports it; `claimed` is the untrusted body."""
        ...


@dataclass
class ProviderRegistration:
    handler: ProviderHandler
    reader: ProviderTaskReader | None = None  # set: a per-job-secret provider


@dataclass
class ProviderRegistry:
    """Which providers may call us and who handles their callbacks (filled at start-up)."""

    providers: dict[str, ProviderRegistration] = field(default_factory=dict)

    def register(self, provider: str, handler: ProviderHandler, *, reader: ProviderTaskReader | None = None) -> None:
        self.providers[provider] = ProviderRegistration(handler, reader)


def parse_provider_secrets(raw: SecretStr | str) -> dict[str, list[str]]:
    """`provider=whsec_new whsec_old,other=whsec_x` -> {provider: [secrets]}."""
    text = raw.get_secret_value() if isinstance(raw, SecretStr) else raw
    result: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        provider, sep, secrets = item.partition("=")
        if not sep or not provider.strip():
            raise ValueError("SVD_SERVE_PROVIDER_WEBHOOK_SECRETS entries must look like provider=whsec_...")
        result[provider.strip()] = parse_secrets(secrets, setting="SVD_SERVE_PROVIDER_WEBHOOK_SECRETS")
    return result


class SignatureVerifier:
    """Standard Webhooks verification with our own tolerance, robust to malformed headers."""

    def __init__(self, secrets: list[str], *, tolerance_s: int) -> None:
        self._webhooks = [Webhook(secret) for secret in secrets]
        self._tolerance_s = tolerance_s

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: float | None = None) -> str:
        """Return the `webhook-id` of a genuine, fresh call; raise `Unauthorized` otherwise."""
        message_id = headers.get("webhook-id", "")
        timestamp = headers.get("webhook-timestamp", "")
        signatures = headers.get("webhook-signature", "")
        if not (message_id and timestamp and signatures):
            raise Unauthorized("The webhook-id, webhook-timestamp and webhook-signature headers are required.",
                               code="webhook_signature_missing")
        if not timestamp.isdigit():
            raise Unauthorized("webhook-timestamp must be unix seconds.", code="webhook_timestamp_invalid")
        skew = abs((time.time() if now is None else now) - int(timestamp))
        if skew > self._tolerance_s:
            raise Unauthorized(f"webhook-timestamp is more than {self._tolerance_s} s from now.",
                               code="webhook_timestamp_out_of_range")
        try:
            text = body.decode()
        except UnicodeDecodeError:
            raise Unauthorized("The body is not UTF-8, so it cannot carry a valid signature.",
                               code="webhook_signature_invalid") from None
        moment = _utc(int(timestamp))
        expected = [base64.b64decode(hook.sign(message_id, moment, text).partition(",")[2]) for hook in self._webhooks]
        for candidate in signatures.split():
            version, _, encoded = candidate.partition(",")
            if version != "v1":
                continue
            try:
                given = base64.b64decode(encoded, validate=True)
            except ValueError:
                continue
            # Every expected signature is compared (constant time each), none skipped early.
            if any([hmac.compare_digest(given, want) for want in expected]):
                return message_id
        raise Unauthorized("No webhook signature matches.", code="webhook_signature_invalid")


def _utc(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


class CallbackTokens:
    """Per-job secrets for callback URLs: derived (HMAC), so nothing has to be stored."""

    def __init__(self, secret: SecretStr) -> None:
        self._key = hashlib.sha256(b"svd-serve provider callback\0" + secret.get_secret_value().encode()).digest()

    def token(self, provider: str, job_id: str) -> str:
        digest = hmac.new(self._key, f"{provider}\0{job_id}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def check(self, provider: str, job_id: str, token: str) -> bool:
        return hmac.compare_digest(self.token(provider, job_id).encode(), token.encode())

    def callback_url(self, public_base_url: str, provider: str, job_id: str) -> str:
        """The URL to hand a provider that signs nothing, for this one job."""
        base = public_base_url.rstrip("/")
        return f"{base}{CALLBACK_PATH}/{provider}?job={job_id}&token={self.token(provider, job_id)}"


@dataclass(frozen=True)
class InboundResult:
    status: Literal["processed", "duplicate"]
    delivery_id: str


class InboundWebhooks:
    """Verifies, deduplicates and dispatches provider callbacks."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        registry: ProviderRegistry,
        *,
        signing_secrets: Mapping[str, list[str]],
        tokens: CallbackTokens,
        tolerance_s: int,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._registry = registry
        self._verifiers = {p: SignatureVerifier(s, tolerance_s=tolerance_s) for p, s in signing_secrets.items() if s}
        self._tokens = tokens

    async def receive(
        self, provider: str, headers: Mapping[str, str], body: bytes, query: Mapping[str, str]
    ) -> InboundResult:
        registration = self._registry.providers.get(provider)
        if registration is None:
            raise NotFound(f"No provider {provider!r} sends webhooks here.")
        verifier = self._verifiers.get(provider)
        if verifier is not None:
            delivery_id = verifier.verify(headers, body)
            payload = _json_object(body)
            event = InboundEvent(provider, delivery_id, payload, "signature")
        elif registration.reader is not None:
            job_id, token = query.get("job", ""), query.get("token", "")
            if not (job_id and token and self._tokens.check(provider, job_id, token)):
                raise Unauthorized("The callback URL's job token is missing or wrong.", code="webhook_token_invalid")
            delivery_id = "job-" + hashlib.sha256(job_id.encode() + b"\0" + body).hexdigest()
            claimed = _json_object(body) if body.strip() else {}
            event = InboundEvent(provider, delivery_id, claimed, "job_secret", job_id=job_id)
        else:
            # Registered, but no way to tell a genuine call from a forged one: refuse all.
            raise Unauthorized(f"Webhooks from {provider!r} cannot be verified.", code="webhook_unverifiable")

        key = self._keys.inbound_webhook(provider, delivery_id)
        if not await self._redis.set(key, "1", nx=True, ex=INBOUND_DEDUPE_TTL_S):
            log.info("provider_webhook_duplicate", provider=provider, delivery_id=delivery_id)
            return InboundResult("duplicate", delivery_id)
        try:
            if registration.reader is not None and event.job_id is not None:
                trusted = await registration.reader.read_task(event.job_id, event.payload)
                event = InboundEvent(provider, delivery_id, trusted, "job_secret", job_id=event.job_id)
            await registration.handler(event)
        except BaseException as exc:
            # Not processed after all: let the provider's retry in.
            await self._redis.delete(key)
            if isinstance(exc, Exception) and not isinstance(exc, SvdServeError):
                log.error("provider_webhook_failed", provider=provider, delivery_id=delivery_id, error=repr(exc))
                raise RetryableError("The callback could not be processed now; send it again.",
                                     code="webhook_processing_failed") from exc
            raise
        log.info("provider_webhook_processed", provider=provider, delivery_id=delivery_id)
        return InboundResult("processed", delivery_id)


def _json_object(body: bytes) -> dict[str, Any]:
    payload = strict_json.loads(body, "The webhook body")  # NaN, Infinity and lone surrogates are not JSON
    if not isinstance(payload, dict):
        raise InvalidInput("The webhook body must be a JSON object.", code="invalid_json")
    return payload
