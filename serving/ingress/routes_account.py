"""/api/v1/me and /api/v1/estimate: who the caller is, and what a submission would cost."""

from __future__ import annotations

from fastapi import APIRouter, Request

from serving.cost import check_provider, job_estimate
from serving.ingress.deps import OwnerDep, PrincipalDep, ServicesDep
from serving.ingress.image_input import options_request_body, read_options
from serving.ingress.schemas import EstimateResponse, MeResponse
from serving.ingress.validation import resolve_params

router = APIRouter(prefix="/api/v1", tags=["account"])


@router.get("/me", response_model=MeResponse, response_model_by_alias=True, operation_id="getMe")
async def me(services: ServicesDep, principal: PrincipalDep) -> MeResponse:
    """The owner behind the API key and its scopes; `authDisabled` in development mode, where
    no key is needed and every caller is owner `local`."""
    return MeResponse(
        owner_id=principal.owner_id,
        scopes=sorted(scope.value for scope in principal.scopes),
        auth_disabled=services.settings.auth_disabled,
    )


@router.post("/estimate", response_model=EstimateResponse, response_model_by_alias=True,
             operation_id="estimateCost", openapi_extra={"requestBody": options_request_body()},
             responses={415: {"description": "Unsupported content type"},
                        422: {"description": "Invalid input (problem+json)"}})
async def estimate_cost(request: Request, services: ServicesDep, owner: OwnerDep) -> EstimateResponse:
    """What `POST /api/v1/animate-image` with these fields (JSON, no image) would cost, checked
    like a submission (the same 422 answers); nothing is created or reserved."""
    options = await read_options(request)
    params = resolve_params(options, services.settings.default_model)
    check_provider(services.settings, options.provider, options.prompt)
    expected = job_estimate(services.settings, params, options.provider)
    shown = params.to_json()
    if options.seed is None:
        shown.pop("seed", None)  # a random seed is drawn at submission, not here
    return EstimateResponse(
        provider=expected.provider,
        estimated_cost_usd=expected.usd,
        gpu_seconds=expected.gpu_seconds,
        credits=expected.credits,
        params=shown,
    )
