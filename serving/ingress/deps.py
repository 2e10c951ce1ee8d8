"""Typed dependencies: clients live on `app.state.services`, created in the lifespan (STYLE 9).

Authentication, scopes and the per-key rate limit are dependencies too: a route declares what
it needs (`ReadOwnerDep`, `SubmitOwnerDep`, `AdminDep`) and gets the caller's owner id.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import redis.asyncio as aioredis
from fastapi import Depends, Path, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BeforeValidator
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection

from serving.cost import Budgets
from serving.db.jobs import JobRepository
from serving.errors import Forbidden, NotFound, Unauthorized
from serving.keys import Keys
from serving.lifecycle import JobLifecycle
from serving.observability.job_metrics import JobMetrics
from serving.queue import JobQueue
from serving.security.auth import LOCAL_OWNER
from serving.security.middleware import RATE_LIMIT_STATE
from serving.security.quotas import JobReservation
from serving.security.scopes import Principal, Scope
from serving.security.setup import SecurityServices
from serving.settings import Settings
from serving.storage import ObjectStorage
from serving.strict_json import unstorable

if TYPE_CHECKING:
    from serving.webhooks.services import DeliveryServices

__all__ = [
    "LOCAL_OWNER", "Services", "ServicesDep", "PrincipalDep", "OwnerDep", "ReadOwnerDep", "SubmitOwnerDep",
    "AdminDep", "JobAdmissionDep", "JobIdPath", "PageLimit", "QueryText", "authenticate", "get_owner",
    "require_scope",
]


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]  # the one session factory of `engine`
    jobs: JobRepository
    queue: JobQueue
    storage: ObjectStorage
    redis: aioredis.Redis
    keys: Keys
    api_key_owners: dict[str, str]  # static bootstrap keys (SVD_SERVE_API_KEYS): key -> owner
    budgets: Budgets  # monthly budgets per owner (issue #6)
    delivery: DeliveryServices | None = None  # events and webhooks (serving.webhooks.services)
    security: SecurityServices = field(repr=False, default=None)  # type: ignore[assignment]  # set in the lifespan

    def lifecycle(self) -> JobLifecycle:
        """The ingress's side of a job's lifecycle: its changes, events, webhooks and metrics."""
        return JobLifecycle(
            self.jobs,
            self.delivery.notifier if self.delivery is not None else None,
            JobMetrics(self.redis, self.keys, self.settings.gpu_hour_price_usd),
        )


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def authenticate(connection: HTTPConnection, services: Services) -> Principal:
    """The caller behind the bearer key (401 without a valid one), after its rate limit (429).
    An address that keeps failing to authenticate is refused (429) before its key is looked up."""
    security = services.security
    address = connection.client.host if connection.client else "unknown"
    if not security.authenticator.disabled:
        await security.auth_failures.check(address)
    try:
        principal = await security.authenticator.authenticate(connection.headers.get("authorization"))
    except Unauthorized:
        await security.auth_failures.record(address)
        raise
    decision = await security.rate_limiter.hit(principal.key_id)
    if decision is not None:
        setattr(connection.state, RATE_LIMIT_STATE, decision.headers())
    return principal


# Declares the bearer scheme in the OpenAPI document (clients and schemathesis read it); the
# header itself is checked by `authenticate`, which also serves WebSocket routes.
bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="ApiKey", description="An API key from `svd-serve keys create`."
)


async def get_principal(
    request: Request,
    services: ServicesDep,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> Principal:
    """`authenticate` as a dependency; FastAPI caches it per request, so a route that needs
    several scopes is authenticated and rate limited once."""
    return await authenticate(request, services)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_scope(scope: Scope) -> Callable[..., Coroutine[Any, Any, str]]:
    """A dependency that answers 403 unless the caller's key has `scope`; yields the owner id."""

    async def owner_with_scope(principal: PrincipalDep) -> str:
        if not principal.allows(scope):
            raise Forbidden(f"This API key lacks the `{scope.value}` scope.")
        return principal.owner_id

    owner_with_scope.__name__ = f"owner_with_{scope.value}_scope"
    return owner_with_scope


async def get_owner(connection: HTTPConnection, services: Services) -> str:
    """The owner behind a key with the `read` scope, for routes that authenticate by hand
    (WebSocket handlers, which cannot use HTTP dependencies the same way)."""
    principal = await authenticate(connection, services)
    if not principal.allows(Scope.READ):
        raise Forbidden(f"This API key lacks the `{Scope.READ.value}` scope.")
    return principal.owner_id


OwnerDep = Annotated[str, Depends(require_scope(Scope.READ))]  # reading one's own jobs
ReadOwnerDep = OwnerDep
SubmitOwnerDep = Annotated[str, Depends(require_scope(Scope.SUBMIT))]  # submit, cancel, retry
AdminDep = Annotated[str, Depends(require_scope(Scope.ADMIN))]


class JobAdmission:
    """The quota slot of one submission: kept when the route calls `accepted(True)`, given back
    otherwise (refused input, an Idempotency-Key repeat, any error)."""

    def __init__(self, reservation: JobReservation) -> None:
        self._reservation = reservation
        self._created = False

    def accepted(self, created: bool) -> None:
        self._created = created


async def job_admission(services: ServicesDep, owner: SubmitOwnerDep) -> AsyncIterator[JobAdmission]:
    """Checks the owner's quotas before the body is read (429 with Retry-After)."""
    reservation = await services.security.quotas.reserve_job(owner)
    admission = JobAdmission(reservation)
    try:
        yield admission
    finally:
        if not admission._created:
            await reservation.release()


JobAdmissionDep = Annotated[JobAdmission, Depends(job_admission)]


def _job_id(
    job_id: Annotated[
        str, Path(description="The job id (a UUID); anything else answers 404 like a missing job.")
    ],
) -> str:
    """The canonical job id. A malformed id answers 404 exactly like a missing or foreign job:
    one answer for every id the caller may not see."""
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        raise NotFound(f"Job {job_id[:64]} was not found.") from None


JobIdPath = Annotated[str, Depends(_job_id)]


# Query parameters -----------------------------------------------------------------------------

_DECIMAL = re.compile(r"[0-9]{1,9}")


def _decimal_integer(value: object) -> object:
    """An integer query parameter as plain decimal digits: pydantic's lax parsing would also take
    `1.0`, `+5` and ` 5`, so a malformed value would pass unnoticed."""
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise ValueError("must be written as decimal digits")
    return value


def _storable(value: str | None) -> str | None:
    """Text that reaches a query of the job store: nothing PostgreSQL refuses (a NUL), which
    would otherwise fail the query rather than the request."""
    if value is not None and (problem := unstorable(value, "value")):
        raise ValueError(problem.removeprefix("`value` "))
    return value


# A page size: 1 to 100 items.
PageLimit = Annotated[int, Query(ge=1, le=100), BeforeValidator(_decimal_integer)]
# A text query parameter compared in the job store (an owner id).
QueryText = Annotated[str, AfterValidator(_storable)]
