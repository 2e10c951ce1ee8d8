"""The delivery loop: sends due webhooks, records every attempt, schedules the next or ends it.

At least once: a delivery leaves the schedule only after its outcome is in the database, and
every attempt repeats the message's `webhook-id` (receivers deduplicate on it) with a fresh
timestamp and signatures. One attempt lasts at most `timeout_s`; redirects are not followed;
2xx ends the delivery, 410 Gone disables the endpoint, anything else is retried on the schedule
(no earlier than the receiver's `Retry-After`) until the schedule runs out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import structlog

from serving.errors import SvdServeError
from serving.observability.webhook_metrics import WebhookMetrics
from serving.webhooks.schedule import RetryPolicy, parse_retry_after
from serving.webhooks.scheduler import DueDeliveries
from serving.webhooks.signing import WebhookSigner
from serving.webhooks.store import AttemptOutcome, DeliveryRecord, DeliveryStatus, WebhookStore

log = structlog.get_logger(__name__)

# The body one attempt of a delivery sends (same message, maybe with its links signed again).
BodyForAttempt = Callable[[DeliveryRecord], Awaitable[str]]

# A claimed delivery is held this much longer than one attempt may take before another loop
# may take it over (its holder must have died).
LEASE_MARGIN_S = 30.0
# Pending rows are re-scheduled from the database this often, in case Redis lost them.
SWEEP_INTERVAL_S = 60.0


@dataclass(frozen=True)
class AttemptResult:
    """What one HTTP attempt came to."""

    status_code: int | None
    latency_ms: float
    error: str | None
    retry_after_s: float | None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def gone(self) -> bool:
        return self.status_code == 410


class DeliveryWorker:
    """Runs the delivery loop on the current event loop (`start`/`close`), or single
    deliveries (`deliver`) for callers that drive it themselves."""

    def __init__(
        self,
        store: WebhookStore,
        due: DueDeliveries,
        signer: WebhookSigner,
        client: httpx.AsyncClient,
        *,
        policy: RetryPolicy,
        timeout_s: float,
        concurrency: int = 8,
        poll_interval_s: float = 0.5,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
        metrics: WebhookMetrics | None = None,
        body_for: BodyForAttempt | None = None,
        recover: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self._store = store
        self._due = due
        self._signer = signer
        self._client = client
        self._policy = policy
        self._timeout_s = timeout_s
        self._concurrency = max(1, concurrency)
        self._poll_interval_s = poll_interval_s
        self._sweep_interval_s = sweep_interval_s
        self._metrics = metrics
        # What an attempt sends (None: the recorded payload): lets late retries carry fresh links.
        self._body_for = body_for
        # Run by each sweep: records deliveries that a crash kept from being recorded at all.
        self._recover = recover
        self._lease_s = timeout_s + LEASE_MARGIN_S
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("DeliveryWorker already started")
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="webhook-delivery-loop")

    async def close(self) -> None:
        """Stop the loop; attempts in flight are abandoned and retried once their lease ends."""
        self._stopping.set()
        tasks = [t for t in (self._task, *self._inflight) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._task = None
        self._inflight.clear()

    async def _run(self) -> None:
        next_sweep = 0.0
        while not self._stopping.is_set():
            claimed: list[str] = []
            try:
                if time.monotonic() >= next_sweep:
                    await self.sweep()
                    next_sweep = time.monotonic() + self._sweep_interval_s
                free = self._concurrency - len(self._inflight)
                if free > 0:
                    claimed = await self._due.claim(free, self._lease_s)
            except Exception as exc:  # Redis or the DB away: keep trying, slowly
                log.warning("webhook_loop_error", error=repr(exc))
            for delivery_id in claimed:
                task = asyncio.create_task(self._deliver_logged(delivery_id), name=f"webhook:{delivery_id}")
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            if not claimed:
                try:
                    await asyncio.wait_for(self._stopping.wait(), timeout=self._poll_interval_s)
                except TimeoutError:
                    pass

    async def sweep(self) -> int:
        """Re-schedule pending deliveries that the schedule lacks (Redis lost them, or a crash
        came between the DB write and the schedule), after recording those of jobs that ended
        without one. Returns how many were looked at."""
        if self._recover is not None:
            await self._recover()
        pending = await self._store.due_pending()
        for delivery_id, due_at in pending:
            await self._due.schedule(delivery_id, due_at.timestamp(), only_new=True)
        return len(pending)

    async def _deliver_logged(self, delivery_id: str) -> None:
        try:
            await self.deliver(delivery_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # its lease runs out and it is tried again
            log.error("webhook_delivery_error", delivery_id=delivery_id, error=repr(exc))

    async def deliver(self, delivery_id: str) -> DeliveryRecord | None:
        """One attempt of a claimed delivery, recorded, then rescheduled or finished."""
        delivery = await self._store.get(delivery_id)
        if delivery is None or delivery.status is not DeliveryStatus.PENDING:
            await self._due.done(delivery_id)
            return delivery
        if await self._store.is_disabled(delivery.owner_id, delivery.url):
            await self._store.mark_disabled(delivery.id, "The endpoint is disabled: it answered 410 Gone.")
            await self._due.done(delivery.id)
            log.info("webhook_skipped_disabled_endpoint", delivery_id=delivery.id, job_id=delivery.job_id)
            return await self._store.get(delivery.id)

        attempted_at = dt.datetime.now(dt.timezone.utc)
        result = await self.send(delivery)
        next_at: dt.datetime | None = None
        if result.succeeded:
            outcome = AttemptOutcome.SUCCEEDED
        elif result.gone:
            outcome = AttemptOutcome.DISABLED
            await self._store.disable_endpoint(delivery.owner_id, delivery.url, "410 Gone")
        else:
            delay = self._policy.delay_before(delivery.round_attempts + 1, result.retry_after_s)
            if delay is None:
                outcome = AttemptOutcome.FAILED
            else:
                outcome = AttemptOutcome.RETRY
                next_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=delay)
        updated = await self._store.record_attempt(
            delivery,
            attempted_at=attempted_at,
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            error=result.error,
            outcome=outcome,
            next_attempt_at=next_at,
        )
        if next_at is not None:
            await self._due.schedule(delivery.id, next_at.timestamp())
        else:
            await self._due.done(delivery.id)
        if self._metrics is not None:
            await self._metrics.attempt(outcome.value, result.latency_ms / 1000)
        log.info(
            "webhook_attempt",
            delivery_id=delivery.id,
            job_id=delivery.job_id,
            attempt=updated.attempts,
            status_code=result.status_code,
            latency_ms=round(result.latency_ms, 1),
            outcome=outcome.value,
            error=result.error,
        )
        return updated

    async def send(self, delivery: DeliveryRecord) -> AttemptResult:
        """POST the signed payload once; never raises for what the receiver or network does."""
        body = await self._body(delivery)
        headers = {"content-type": "application/json", **self._signer.headers(delivery.id, body)}
        started = time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            # One deadline for the whole exchange: httpx's timeout is per read, and a receiver
            # that drips bytes could otherwise hold an attempt far longer.
            async with asyncio.timeout(self._timeout_s):
                # The body is never read: only the status code and Retry-After matter.
                async with self._client.stream(
                    "POST", delivery.url, content=body.encode(), headers=headers
                ) as response:
                    status_code = response.status_code
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
        except (TimeoutError, httpx.TimeoutException):
            error = f"No answer within {self._timeout_s:g} s."
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except SvdServeError as exc:  # the URL policy refused the address at connect time
            error = f"{exc.code}: {exc.message}"
        latency_ms = (time.perf_counter() - started) * 1000
        if status_code is not None and not 200 <= status_code < 300:
            error = f"HTTP {status_code}"
            if 300 <= status_code < 400:
                error += " (redirects are not followed)"
        return AttemptResult(status_code, latency_ms, error, retry_after)

    async def _body(self, delivery: DeliveryRecord) -> str:
        if self._body_for is None:
            return delivery.payload
        try:
            return await self._body_for(delivery)
        except Exception as exc:  # the recorded body is still a correct message
            log.warning("webhook_body_refresh_failed", delivery_id=delivery.id, error=repr(exc))
            return delivery.payload
