"""/api/v1/animate-image: submit, status, list, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from serving.cost import job_estimate
from serving.db.jobs import JobRecord
from serving.errors import SvdServeError
from serving.ingress.deps import (
    JobAdmissionDep,
    JobIdPath,
    OwnerDep,
    PageLimit,
    PrincipalDep,
    Services,
    ServicesDep,
    SubmitOwnerDep,
)
from serving.ingress.image_input import read_submission, submission_request_body
from serving.ingress.schemas import AcceptedResponse, JobListResponse, JobStatusResponse
from serving.ingress.submission import cancel_job, retry_job, submit_job
from serving.ingress.views import job_view
from serving.metrics import CANCELS, SUBMISSIONS
from serving.security.scopes import Scope
from serving.types import JobStatus

router = APIRouter(prefix="/api/v1/animate-image", tags=["jobs"])
# Answers every authenticated route may give (problem+json); a job id that is malformed, missing
# or another owner's answers 404 alike.
READ_PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key"},
    403: {"description": "The API key lacks the scope"},
    404: {"description": "No such job (or not yours)"},
    429: {"description": "Rate limit or quota exhausted; see Retry-After"},
}
SUBMIT_PROBLEMS: dict[int | str, dict[str, Any]] = {
    **{k: v for k, v in READ_PROBLEMS.items() if k != 404},
    200: {"description": "The job of an earlier request with the same Idempotency-Key", "model": AcceptedResponse},
    413: {"description": "The body or the image is too large"},
    415: {"description": "Unsupported content type or image format"},
}

SUBMIT_DOC = """Submit an image to animate.

Send **multipart/form-data** with an `image` file (PNG, JPEG or WebP) and optional fields, or
**application/json** with `imageUrl` or `imageBase64`. Optional fields: `prompt`, `model`,
`numFrames`, `fps`, `motionBucketId`, `noiseAugStrength`, `numInferenceSteps`, `minGuidanceScale`,
`maxGuidanceScale`, `seed`, `width`/`height` (multiples of 64), `outputs` (any of `mp4`,
`webm`, `gif`, `webp`, `thumbnail`, `frames`; default `mp4,thumbnail`), `interpolateFps`, `loop`,
`cache` (false skips the result cache), `priority` (high|normal|low), `provider`, `webhookUrl`,
`metadata`. Header `Idempotency-Key` returns the same job for a repeat. Answers 202 with the job id
at once (200 with `status: completed` when an identical earlier request with a fixed seed is reused)."""


@router.post("", operation_id="submitJob", status_code=202, response_model=AcceptedResponse, description=SUBMIT_DOC,
             responses={422: {"description": "Invalid input (problem+json)"}, **SUBMIT_PROBLEMS},
             openapi_extra={"requestBody": submission_request_body()})
async def submit(
    request: Request,
    services: ServicesDep,
    owner: SubmitOwnerDep,
    admission: JobAdmissionDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JSONResponse:
    model_label = "unknown"
    try:
        submission = await read_submission(
            request, services.settings.max_upload_bytes, services.security.url_policy,
            services.settings.url_fetch_timeout_s,
        )
        model_label = submission.options.model or services.settings.default_model
        record, created = await submit_job(services, owner, submission, idempotency_key)
        admission.accepted(created)  # a repeat of an Idempotency-Key costs no quota
    except SvdServeError as exc:
        SUBMISSIONS.labels(str(exc.status), model_label if exc.code != "unknown_model" else "unknown").inc()
        raise
    SUBMISSIONS.labels("202", record.model).inc()
    return _accepted(services, record, status_code=202 if created else 200)


def _accepted(services: Services, record: JobRecord, status_code: int) -> JSONResponse:
    """The answer to an accepted job: where to follow it, and what it is expected to cost."""
    base = services.settings.resolved_public_base_url
    body = AcceptedResponse(
        job_id=record.id,
        status=record.status,
        status_url=f"{base}/api/v1/animate-image/status/{record.id}",
        events_url=f"{base}/api/v1/animate-image/{record.id}/events",
        estimated_cost_usd=job_estimate(services.settings, record.job_params, record.requested_provider).usd,
    )
    return JSONResponse(body.model_dump(mode="json", by_alias=True), status_code=status_code)


@router.get("/status/{job_id}", operation_id="getJob", response_model=JobStatusResponse, response_model_by_alias=True,
            responses=READ_PROBLEMS)
async def status(services: ServicesDep, owner: OwnerDep, job_id: JobIdPath) -> JobStatusResponse:
    return await job_view(services, await services.jobs.owned(job_id, owner))


@router.get("", operation_id="listJobs", response_model=JobListResponse, response_model_by_alias=True, responses=READ_PROBLEMS)
async def list_jobs(
    services: ServicesDep,
    owner: OwnerDep,
    limit: PageLimit = 20,
    cursor: str | None = None,
    status: JobStatus | None = None,
) -> JobListResponse:
    records, next_cursor = await services.jobs.list_for_owner(owner, limit=limit, cursor=cursor, status=status)
    return JobListResponse(jobs=[await job_view(services, r, live=False) for r in records], next_cursor=next_cursor)


@router.delete("/{job_id}", operation_id="cancelJob", response_model=JobStatusResponse, response_model_by_alias=True,
               responses={**READ_PROBLEMS, 409: {"description": "The job has already ended (problem+json)"}})
async def cancel(services: ServicesDep, owner: SubmitOwnerDep, job_id: JobIdPath) -> JobStatusResponse:
    before = await services.jobs.get(job_id, owner_id=owner)
    record = await cancel_job(services, owner, job_id)
    CANCELS.labels(before.status.value if before else "unknown").inc()
    return await job_view(services, record)


@router.post("/{job_id}/retry", operation_id="retryJob", status_code=202, response_model=AcceptedResponse,
             responses={**READ_PROBLEMS, 409: {"description": "The job has not failed (problem+json)"}})
async def retry(
    services: ServicesDep, owner: SubmitOwnerDep, admission: JobAdmissionDep, job_id: JobIdPath,
    principal: PrincipalDep,
) -> JSONResponse:
    """Re-run a job that ended in `error` (a dead letter) or was canceled, as a new job with the
    same input and parameters; answers 202 with the new job's id (its status has `retryOf`).
    A key with the `admin` scope may retry any owner's job (the new job is that owner's)."""
    record = await retry_job(services, owner, job_id, any_owner=Scope.ADMIN in principal.scopes)
    admission.accepted(True)
    return _accepted(services, record, status_code=202)
