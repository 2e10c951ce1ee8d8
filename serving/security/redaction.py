"""Secrets never reach the logs: a structlog processor that blanks sensitive fields and scrubs
bearer tokens, our API keys, configured secret values and URL signatures out of every string."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from pydantic import SecretStr

REDACTED = "[redacted]"
# Field names whose values are secrets whatever they contain.
_SENSITIVE_NAME = re.compile(
    r"(authorization|api[_-]?key|apikey|token|secret|password|passwd|signature|credential|cookie|private[_-]?key)",
    re.IGNORECASE,
)
_PATTERNS = [
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + REDACTED),
    (re.compile(r"\bsvd_[0-9a-f]{12}_[A-Za-z0-9_-]+"), REDACTED),  # our API keys
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"), REDACTED),  # webhook signing secrets
    # Presigned / signed URL parameters: the URL itself may be logged, its credentials not.
    (
        re.compile(
            r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|"
            r"access_token|api_key|apikey|key)=)[^&#\s\"']+"
        ),
        r"\1" + REDACTED,
    ),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@"), r"\1" + REDACTED + "@"),  # user:pass@
]
_MAX_DEPTH = 6


class SecretRedactor:
    """A structlog processor; `secrets` are exact values (from the settings) to blank anywhere."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Short values would blank innocent text; real secrets are long.
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def redact_text(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def redact(self, value: Any, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            return value
        if isinstance(value, SecretStr):
            return REDACTED
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, bytes):
            return self.redact_text(value.decode("utf-8", "replace"))
        if isinstance(value, Mapping):
            return {
                k: REDACTED if isinstance(k, str) and _SENSITIVE_NAME.search(k) else self.redact(v, depth + 1)
                for k, v in value.items()
            }
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self.redact(v, depth + 1) for v in value]
        return value

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            value = event_dict[key]
            if key != "event" and _SENSITIVE_NAME.search(key):
                event_dict[key] = REDACTED
            elif isinstance(value, BaseException):
                event_dict[key] = self.redact_text(repr(value))
            else:
                event_dict[key] = self.redact(value)
        return event_dict


def secret_values(settings: Any) -> list[str]:
    """Every secret the settings hold: SecretStr fields and the keys of `api_keys`."""
    values: list[str] = []
    for name in type(settings).model_fields:
        field = getattr(settings, name)
        if isinstance(field, SecretStr):
            raw = field.get_secret_value()
            values.append(raw)
            if name == "api_keys":
                values.extend(item.partition(":")[2].strip() for item in raw.split(","))
            elif " " in raw or "," in raw:
                values.extend(p for p in re.split(r"[\s,=]+", raw) if p)
    return [v for v in values if v]


def redact_secrets(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The processor without configured values (patterns and field names only)."""
    return _DEFAULT(logger, method_name, event_dict)


_DEFAULT = SecretRedactor()


def install_redaction(settings: Any) -> SecretRedactor:
    """Add a `SecretRedactor` for `settings` to the configured structlog chain, just before its
    renderer (the last processor), so that nothing is rendered unredacted."""
    import structlog

    redactor = SecretRedactor(secret_values(settings))
    processors = [p for p in structlog.get_config()["processors"] if not isinstance(p, SecretRedactor)]
    structlog.configure(processors=[*processors[:-1], redactor, *processors[-1:]])
    return redactor
