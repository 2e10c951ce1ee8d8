"""Standard Webhooks signing: `webhook-id`, `webhook-timestamp`, `webhook-signature`.

The signature is HMAC-SHA256 over `{id}.{timestamp}.{body}` with a `whsec_` secret, computed by the
`standardwebhooks` reference package. During a secret rotation the settings list two secrets and
every message carries both signatures, so receivers on the old or the new secret both verify.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt

from pydantic import SecretStr
from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"


def parse_secrets(raw: SecretStr | str, *, setting: str = "SVD_SERVE_WEBHOOK_SECRETS") -> list[str]:
    """Space- or comma-separated `whsec_` secrets, each checked to be valid base64."""
    text = raw.get_secret_value() if isinstance(raw, SecretStr) else raw
    secrets = [part for part in text.replace(",", " ").split() if part]
    for secret in secrets:
        if not secret.startswith(SECRET_PREFIX):
            raise ValueError(f"{setting}: every secret must start with {SECRET_PREFIX!r}")
        try:
            if not base64.b64decode(secret[len(SECRET_PREFIX) :] + "==", validate=False):
                raise ValueError(f"{setting}: a secret is empty")
        except binascii.Error as exc:
            raise ValueError(f"{setting}: a secret is not base64 after {SECRET_PREFIX!r}") from exc
    return secrets


class WebhookSigner:
    """Signs outbound messages with every configured secret (newest first)."""

    def __init__(self, secrets: list[str]) -> None:
        if not secrets:
            raise ValueError("at least one webhook signing secret is needed")
        self._webhooks = [Webhook(secret) for secret in secrets]

    def headers(self, message_id: str, body: str, at: dt.datetime | None = None) -> dict[str, str]:
        """The Standard Webhooks headers for one attempt of message `message_id`."""
        moment = (at or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
        signatures = " ".join(hook.sign(message_id, moment, body) for hook in self._webhooks)
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": signatures,
        }
