"""The caller's spending and budget: `GET /api/v1/usage`."""

from __future__ import annotations

from fastapi import APIRouter

from serving.ingress.deps import OwnerDep, ServicesDep
from serving.ingress.schemas import UsageResponse

router = APIRouter(tags=["usage"])


@router.get("/api/v1/usage", response_model=UsageResponse, response_model_by_alias=True)
async def usage(services: ServicesDep, owner: OwnerDep) -> UsageResponse:
    standing = await services.budgets.standing(owner)
    return UsageResponse(
        month=standing.month,
        spent_usd=standing.spent_usd,
        forecast_usd=standing.forecast_usd,
        budget_usd=standing.budget_usd,
        soft_limit_usd=standing.soft_limit_usd,
    )
