"""Typed dependencies: clients live on `app.state.services`, created in the lifespan (STYLE 9)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from serving.db.jobs import JobRepository
from serving.errors import Unauthorized
from serving.keys import Keys
from serving.queue import JobQueue
from serving.settings import Settings
from serving.storage import ObjectStorage

LOCAL_OWNER = "local"


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    jobs: JobRepository
    queue: JobQueue
    storage: ObjectStorage
    redis: aioredis.Redis
    keys: Keys
    api_key_owners: dict[str, str]


def get_services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


ServicesDep = Annotated[Services, Depends(get_services)]


def get_owner(request: Request, services: ServicesDep) -> str:
    """The owner behind the bearer key. With no keys configured (development) everyone is `local`."""
    if not services.api_key_owners:
        return LOCAL_OWNER
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Send `Authorization: Bearer <api key>`.", code="missing_api_key")
    for key, owner in services.api_key_owners.items():
        if hmac.compare_digest(key.encode(), token.strip().encode()):
            return owner
    raise Unauthorized("The API key is not valid.", code="invalid_api_key")


OwnerDep = Annotated[str, Depends(get_owner)]
