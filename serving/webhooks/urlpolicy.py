"""Which webhook receivers we may call: the one place that asks `serving.netguard`.

At submission `check_webhook_url` refuses a URL that is not https (http only in development) or
that resolves to a private, loopback, link-local or metadata address; at delivery the client from
`webhook_client` checks again on every connection and connects only to the checked address.
"""

from __future__ import annotations

import httpx

from serving.errors import InvalidInput, UnsafeUrl
from serving.netguard import UrlPolicy, check_public_url, guarded_client
from serving.settings import Settings
from serving.webhooks.signing import parse_secrets

USER_AGENT = "svd-serve-webhooks/1"


def webhook_url_policy(settings: Settings) -> UrlPolicy:
    return UrlPolicy.from_settings(settings)


async def check_webhook_url(url: str, settings: Settings) -> None:
    """Raise `UnsafeUrl` (422 `unsafe_url`; `InvalidUrl`, 422 `invalid_url`, for a malformed
    URL or host name) unless we may deliver to `url`."""
    try:
        await check_public_url(url, policy=webhook_url_policy(settings))
    except UnsafeUrl as exc:
        raise type(exc)(f"`webhookUrl` is refused: {exc.message}") from exc


def webhook_client(settings: Settings) -> httpx.AsyncClient:
    """The client deliveries use: `webhook_timeout_s` per attempt, redirects never followed."""
    return guarded_client(
        timeout_s=settings.webhook_timeout_s,
        policy=webhook_url_policy(settings),
        headers={"user-agent": USER_AGENT},
    )


def default_webhook_url(settings: Settings, owner_id: str) -> str | None:
    """The owner's configured default, used when a submission names no `webhookUrl`."""
    return settings.owner_webhook_urls.get(owner_id)


async def validate_webhook_url(url: str, settings: Settings) -> None:
    """Refuse a submission's `webhookUrl` that we could not sign for or may not call."""
    if not parse_secrets(settings.webhook_secrets):
        raise InvalidInput(
            "This server sends no webhooks (no signing secret is configured); leave out `webhookUrl`.",
            code="webhooks_not_configured",
        )
    await check_webhook_url(url, settings)
