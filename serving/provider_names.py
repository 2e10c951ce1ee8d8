"""Provider names, defined once: what a client may ask for and what a job records.

A client asks for `auto` (the router decides), `local`, `runway`, `fal`, or `pika` (fal's
default model is Pika image-to-video, so `pika` is fal by its better-known name). A job records
where it ran: `local`, `runway` or `fal`.
"""

from __future__ import annotations

import enum
from typing import Literal, get_args


class Provider(str, enum.Enum):
    """Where a job runs."""

    LOCAL = "local"
    RUNWAY = "runway"
    FAL = "fal"


LOCAL = Provider.LOCAL.value
RUNWAY = Provider.RUNWAY.value
FAL = Provider.FAL.value
AUTO = "auto"
PROVIDERS = tuple(p.value for p in Provider)
MANAGED = (RUNWAY, FAL)  # paid services that run a task we create, poll and may resume

ManagedProvider = Literal["runway", "fal"]  # the settings' `fallback_provider`
# What the API's `provider` field accepts.
RequestedProvider = Literal["auto", "local", "runway", "fal", "pika"]
REQUESTABLE: tuple[str, ...] = get_args(RequestedProvider)
ALIASES = {"pika": FAL}


def canonical(requested: str) -> str:
    """The provider (or `auto`) a requested name means: `pika` -> `fal`."""
    return ALIASES.get(requested, requested)



def provider_error_code(provider: str, upstream: str | None) -> str:
    """A provider's own failure code (Runway's `SAFETY.INPUT.IMAGE`, fal's
    `content_policy_violation`) as one of our error codes (`runway_safety_input_image`)."""
    if not upstream:
        return "provider_failed"
    return (f"{provider}_" + upstream.lower().replace(".", "_").replace("-", "_"))[:64]
