"""Accepting a job: store the input, write the row, enqueue. All or nothing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import structlog
from redis.exceptions import LockError

from serving.cost import admit_cost, check_provider
from serving.backpressure import admit, confirm_admission
from serving.db.errors import DuplicateIdempotencyKey
from serving.db.jobs import JobRecord
from serving.errors import CapacityError, Conflict, InvalidTransition, RateLimited
from serving.ingress.deps import Services
from serving.ingress.idempotency import IdempotencyGuard, request_fingerprint
from serving.ingress.image_input import Submission
from serving.ingress.validation import CheckedImage, check_image, resolve_params
from serving.keys import CANCEL_TTL_S
from serving.lifecycle import JobLifecycle
from serving.observability.tracing import job_span
from serving.result_cache import ResultCache, cache_applies, input_hash
from serving.types import JobParams, JobStatus, Priority, QueuedJob
from serving.webhooks.urlpolicy import default_webhook_url, validate_webhook_url

log = structlog.get_logger(__name__)

# The per-owner budget admission lock: held from the budget check to the jobs row (which covers
# storing the input image), and waited for at most BUDGET_LOCK_WAIT_S before a 429.
BUDGET_LOCK_TTL_S = 30.0
BUDGET_LOCK_WAIT_S = 10.0


def input_key(owner_id: str, job_id: str, extension: str) -> str:
    return f"{owner_id}/{job_id}/input.{extension}"


async def submit_job(
    services: Services, owner_id: str, submission: Submission, idempotency_key: str | None
) -> tuple[JobRecord, bool]:
    """Validate, then store, record and enqueue. Returns (job, created). Any failure after the
    first write undoes what was written, so a refused or failed submission leaves nothing."""
    params = resolve_params(submission.options, services.settings.default_model)
    check_provider(services.settings, submission.options.provider, submission.options.prompt)  # 422 before storing
    # Decoding and re-encoding a large photo takes about a second: keep it off the event loop.
    image = await asyncio.to_thread(check_image, submission.image_bytes)
    if not submission.options.webhook_url and (default := default_webhook_url(services.settings, owner_id)):
        options = submission.options.model_copy(update={"webhook_url": default})
        submission = dataclasses.replace(submission, options=options)
    if submission.options.webhook_url:
        await validate_webhook_url(submission.options.webhook_url, services.settings)
    if not idempotency_key:
        return await _accept(services, owner_id, submission, params, image, None)
    guard = IdempotencyGuard(services.jobs, services.redis, services.keys, services.settings.idempotency_ttl_s)
    fingerprint = request_fingerprint(submission.image_bytes, submission.options)
    existing = await guard.existing(owner_id, idempotency_key, fingerprint)
    if existing is not None:
        return existing, False
    async with guard.in_flight(owner_id, idempotency_key):
        try:
            return await _accept(services, owner_id, submission, params, image, (idempotency_key, fingerprint))
        except DuplicateIdempotencyKey as exc:
            # A request that held the key before us finished meanwhile: answer with its job.
            guard.check_same_body(exc.existing, idempotency_key, fingerprint)
            return exc.existing, False


async def _accept(
    services: Services,
    owner_id: str,
    submission: Submission,
    params: JobParams,
    image: CheckedImage,
    idempotency: tuple[str, str] | None,
) -> tuple[JobRecord, bool]:
    """Store, record and enqueue one new job (`idempotency`: the key and the request's fingerprint)."""
    job_id = str(uuid.uuid4())
    # The first span of the job's trace; the dispatcher's spans carry the same svd.job_id.
    with job_span("accept", job_id, owner_id=owner_id, model=params.model):
        return await _accept_as(services, job_id, owner_id, submission, params, image, idempotency)


async def _accept_as(
    services: Services,
    job_id: str,
    owner_id: str,
    submission: Submission,
    params: JobParams,
    image: CheckedImage,
    idempotency: tuple[str, str] | None,
) -> tuple[JobRecord, bool]:
    """The submission's steps, in order: look for a cached result; admit to the queue; admit to
    the budget; store the input; write the row; then either complete from the cache or enqueue
    and confirm the queue admission; announce. A step that writes registers its undo on `undo`;
    when a later step fails, the registered undos run in reverse and nothing is left behind."""
    idempotency_key, fingerprint = idempotency or (None, None)
    key = input_key(owner_id, job_id, image.extension)
    options = submission.options
    lifecycle = services.lifecycle()
    request_hash = input_hash(image.data, params, prompt=options.prompt, provider=options.provider)
    cache = ResultCache(lifecycle, services.storage)
    source = None
    if cache_applies(services.settings, seed=options.seed, cache=options.cache):
        source = await cache.find(owner_id, request_hash)
    if source is None:
        await admit(services.queue, options.priority, services.settings)  # bounded queue: 429/503
    async with contextlib.AsyncExitStack() as undo:
        async with budget_admission(services, owner_id, paid=source is None):
            if source is None:
                # A new paid job must fit the owner's monthly budget (402), its unfinished jobs
                # counted; a cached result costs nothing.
                await admit_cost(services.settings, services.budgets, owner_id, params, options.provider)
            await _store_input(services, undo, key, image)
            record = await _create(lifecycle, undo, job_id=job_id, owner_id=owner_id,
                                   image_url=services.storage.uri(key), params=params.to_json(),
                                   model=params.model, priority=options.priority.value, prompt=options.prompt,
                                   metadata=options.metadata or {}, webhook_url=options.webhook_url,
                                   idempotency_key=idempotency_key, input_hash=request_hash,
                                   max_attempts=services.settings.job_attempts,
                                   idempotency_fingerprint=fingerprint, requested_provider=options.provider)
        if source is not None:
            # An identical earlier job: complete from its outputs, never enqueued, no GPU.
            record = await cache.complete(record, source)  # announced there
            undo.pop_all()
            return record, True
        await _enqueue(services, job_id, owner_id, options.priority)
        try:
            await confirm_admission(services.queue, job_id, options.priority, services.settings)
        except RateLimited:
            if await services.queue.remove(job_id):
                raise  # out of the queue again: undo the row and the input
            # else a worker has it already: keep the job
        except Exception as exc:
            # The job is in the queue and a worker may hold it: undoing its row and input now
            # would orphan it. The confirmation only re-checks the queue's bound: keep the job.
            log.warning("queue_admission_unconfirmed", job_id=job_id, error=repr(exc))
        undo.pop_all()
    log.info("job_accepted", job_id=job_id, owner_id=owner_id, model=params.model, source=submission.source)
    await lifecycle.announce(record, queue_position=await _position(services, job_id))
    return record, True


async def retry_job(services: Services, owner_id: str, job_id: str, *, any_owner: bool = False) -> JobRecord:
    """Re-run a job that ended in `error` (or was canceled) as a new job with the same input and
    parameters; the original keeps its one outcome and the new one points at it (`retryOf`).
    With `any_owner` (an admin retrying a dead letter) the job may be another owner's; the new
    job is that owner's, like the original."""
    lifecycle = services.lifecycle()
    original = await services.jobs.owned(job_id, None if any_owner else owner_id)
    owner_id = original.owner_id
    if original.status not in (JobStatus.ERROR, JobStatus.CANCELED):
        raise Conflict(
            f"Job {job_id} is {original.status.value}; only a failed or canceled job can be retried.",
            code="job_not_retryable",
        )
    await admit(services.queue, original.priority, services.settings)
    new_id = str(uuid.uuid4())
    async with contextlib.AsyncExitStack() as undo:
        async with budget_admission(services, owner_id, paid=True):
            # A re-run is a new paid job: it must fit the budget like any other.
            await admit_cost(services.settings, services.budgets, owner_id, original.job_params,
                             original.requested_provider)
            # The stored input is immutable and the original's: shared, so never undone here.
            record = await _create(lifecycle, undo, job_id=new_id, owner_id=owner_id,
                                   image_url=original.image_url, params=original.params, model=original.model,
                                   priority=original.priority.value, prompt=original.prompt,
                                   metadata=original.metadata, webhook_url=original.webhook_url,
                                   input_hash=original.input_hash, max_attempts=services.settings.job_attempts,
                                   retry_of=original.id, requested_provider=original.requested_provider)
        await _enqueue(services, new_id, owner_id, original.priority)
        undo.pop_all()
    log.info("job_retried", job_id=new_id, retry_of=original.id, owner_id=owner_id)
    await lifecycle.announce(record, queue_position=await _position(services, new_id))
    return record


async def _store_input(services: Services, undo: contextlib.AsyncExitStack, key: str, image: CheckedImage) -> None:
    """Step: store the input image (undo: delete it)."""
    await asyncio.to_thread(services.storage.put, key, image.data, image.content_type)
    undo.push_async_callback(asyncio.to_thread, services.storage.delete, key)


async def _create(lifecycle: JobLifecycle, undo: contextlib.AsyncExitStack, **fields: Any) -> JobRecord:
    """Step: write the jobs row (undo: delete it)."""
    record = await lifecycle.create(**fields)
    undo.push_async_callback(lifecycle.delete, record.id)
    return record


@contextlib.asynccontextmanager
async def budget_admission(services: Services, owner_id: str, *, paid: bool) -> AsyncIterator[None]:
    """Admit an owner's paid jobs one at a time when the owner has a budget: the check counts
    the owner's unfinished jobs, so two submissions at once must not both pass it before
    either has written its row."""
    if not paid or services.budgets.budget_for(owner_id) <= 0:
        yield
        return
    lock = services.redis.lock(services.keys.budget_lock(owner_id), timeout=BUDGET_LOCK_TTL_S,
                               blocking_timeout=BUDGET_LOCK_WAIT_S)
    if not await lock.acquire():
        raise RateLimited("Other submissions of yours are being checked against your budget; retry shortly.",
                          retry_after_s=1, code="budget_check_busy")
    try:
        yield
    finally:
        with contextlib.suppress(LockError):  # lapsed: the next submission already went ahead
            await lock.release()


async def _enqueue(services: Services, job_id: str, owner_id: str, priority: Priority) -> None:
    """Step: put the recorded job in the queue; an unreachable queue answers 503 (and the
    caller's registered undos remove what was written)."""
    try:
        await services.queue.add(
            QueuedJob(job_id=job_id, owner_id=owner_id),
            priority=priority,
            attempts=services.settings.job_attempts,
            backoff_ms=services.settings.job_backoff_ms,
        )
    except Exception as exc:
        log.error("enqueue_failed", job_id=job_id, error=repr(exc))
        raise CapacityError("The job queue is unavailable; try again shortly.", code="queue_unavailable") from exc


async def _position(services: Services, job_id: str) -> int | None:
    try:
        return await services.queue.position(job_id)
    except Exception as exc:  # the job is accepted; a missing position only makes the event vaguer
        log.warning("queue_position_failed", job_id=job_id, error=repr(exc))
        return None


async def cancel_job(services: Services, owner_id: str, job_id: str) -> JobRecord:
    """Queued jobs leave the queue and never run; running jobs stop at their next denoising step."""
    lifecycle = services.lifecycle()
    record = await services.jobs.owned(job_id, owner_id)
    if record.status.terminal:
        raise Conflict(f"Job {job_id} is already {record.status.value}.", code="job_finished")
    # Set the flag first: a worker that picks the job up in between sees it before it starts.
    await services.redis.set(services.keys.cancel(job_id), "1", ex=CANCEL_TTL_S)
    if record.status is JobStatus.QUEUED:
        await services.queue.remove(job_id)
    try:
        # The event and the canceled webhook go out with the change.
        return await lifecycle.transition(job_id, JobStatus.CANCELED, stage="canceled")
    except InvalidTransition:
        # It finished in the meantime: that outcome stands.
        current = await services.jobs.get(job_id, owner_id=owner_id)
        state = current.status.value if current else "finished"
        raise Conflict(f"Job {job_id} is already {state}.", code="job_finished") from None
