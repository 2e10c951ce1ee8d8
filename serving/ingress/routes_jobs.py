"""/api/v1/animate-image: submit, status, list, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse

from serving.errors import NotFound, SvdServeError
from serving.ingress.deps import OwnerDep, ServicesDep
from serving.ingress.image_input import read_submission
from serving.ingress.schemas import AcceptedResponse, JobListResponse, JobStatusResponse
from serving.ingress.submission import cancel_job, submit_job
from serving.ingress.views import job_view
from serving.metrics import CANCELS, SUBMISSIONS
from serving.types import JobStatus

router = APIRouter(prefix="/api/v1/animate-image", tags=["jobs"])

SUBMIT_DOC = """Submit an image to animate.

Send **multipart/form-data** with an `image` file (PNG, JPEG or WebP) and optional fields, or
**application/json** with `imageUrl` or `imageBase64`. Optional fields: `prompt`, `model`,
`numFrames`, `fps`, `motionBucketId`, `noiseAugStrength`, `numInferenceSteps`, `minGuidanceScale`,
`maxGuidanceScale`, `seed`, `width`/`height` (multiples of 64), `outputs`, `priority`
(high|normal|low), `provider`, `webhookUrl`, `metadata`. Answers 202 with the job id at once."""


@router.post("", status_code=202, response_model=AcceptedResponse, description=SUBMIT_DOC,
             responses={422: {"description": "Invalid input (problem+json)"}})
async def submit(
    request: Request,
    services: ServicesDep,
    owner: OwnerDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JSONResponse:
    model_label = "unknown"
    try:
        submission = await read_submission(request, services.settings.max_upload_bytes)
        model_label = submission.options.model or services.settings.default_model
        record, created = await submit_job(services, owner, submission, idempotency_key)
    except SvdServeError as exc:
        SUBMISSIONS.labels(str(exc.status), model_label if exc.code != "unknown_model" else "unknown").inc()
        raise
    SUBMISSIONS.labels("202", record.model).inc()
    base = services.settings.resolved_public_base_url
    body = AcceptedResponse(
        job_id=record.id,
        status=record.status,
        status_url=f"{base}/api/v1/animate-image/status/{record.id}",
        events_url=f"{base}/api/v1/animate-image/{record.id}/events",
    )
    return JSONResponse(body.model_dump(mode="json", by_alias=True), status_code=202 if created else 200)


@router.get("/status/{job_id}", response_model=JobStatusResponse, response_model_by_alias=True)
async def status(job_id: str, services: ServicesDep, owner: OwnerDep) -> JobStatusResponse:
    record = await services.jobs.get(job_id, owner_id=owner)
    if record is None:
        raise NotFound(f"Job {job_id} was not found.")
    return await job_view(services, record)


@router.get("", response_model=JobListResponse, response_model_by_alias=True)
async def list_jobs(
    services: ServicesDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
    status: JobStatus | None = None,
) -> JobListResponse:
    records, next_cursor = await services.jobs.list_for_owner(owner, limit=limit, cursor=cursor, status=status)
    return JobListResponse(jobs=[await job_view(services, r, live=False) for r in records], next_cursor=next_cursor)


@router.delete("/{job_id}", response_model=JobStatusResponse, response_model_by_alias=True)
async def cancel(job_id: str, services: ServicesDep, owner: OwnerDep) -> JobStatusResponse:
    before = await services.jobs.get(job_id, owner_id=owner)
    record = await cancel_job(services, owner, job_id)
    CANCELS.labels(before.status.value if before else "unknown").inc()
    return await job_view(services, record)
