"""The one backend the runner sees (issue #14): route, run, fall back, post-process.

For each job it asks the router where to run (or resumes a managed provider's stored task),
records the decision on the job (`provider`, `routing_reason`) and in metrics, runs the chosen
`ProviderBackend`, keeps that provider's breaker informed, and on the last attempt of a job
that failed locally may fall back once to the configured managed provider. Whatever ran, its
clip (frames or a video file) goes through the one post-processing stage (`PostProcess`: the
PostProcessor deployment in the Dispatcher), which stores the outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from serving.backend import PostProcess, ProviderOutcome, StageCallback
from serving.cost import Prices
from serving.db.jobs import JobRepository
from serving.errors import JobCanceled, PermanentError
from serving.provider_names import LOCAL, MANAGED
from serving.providers.router import ProviderRouter, RoutingDecision, RoutingReason
from serving.types import PostProcessRequest, Rendered, RenderJob, RenderOutcome, Stage

if TYPE_CHECKING:
    from serving.observability.job_metrics import JobMetrics

log = structlog.get_logger(__name__)

ENCODING_PROGRESS = 0.92


class RoutedBackend:
    """A `VideoBackend` over every configured provider and one post-processing stage."""

    name = "routed"

    def __init__(
        self,
        router: ProviderRouter,
        postprocess: PostProcess,
        jobs: JobRepository,
        *,
        prices: Prices | None = None,
        metrics: JobMetrics | None = None,
    ) -> None:
        self._router = router
        self._postprocess = postprocess
        self._jobs = jobs
        self._prices = prices
        self._metrics = metrics

    async def render(self, job: RenderJob, on_stage: StageCallback) -> RenderOutcome:
        decision = await self._route(job)
        try:
            rendered = await self._run(decision.provider, job, on_stage)
        except (JobCanceled, PermanentError):
            raise  # the job's own outcome, not a reason to try elsewhere
        except Exception as exc:
            if not (job.last_attempt and decision.provider == LOCAL):
                raise
            fallback = await self._router.route(job.requested_provider, local_failed=True)
            if fallback.provider == LOCAL:
                raise
            log.warning("job_falling_back", job_id=job.job_id, provider=fallback.provider, error=repr(exc))
            decision = fallback
            await self._record(job, decision)
            rendered = await self._run(decision.provider, job, on_stage)
        await on_stage(Stage.ENCODING, ENCODING_PROGRESS)
        processed = await self._postprocess.process(PostProcessRequest.for_job(job), rendered.clip)
        return ProviderOutcome(
            objects=processed.objects,
            gpu_seconds=rendered.gpu_seconds,
            device=rendered.device,
            timings={**rendered.timings, **processed.timings},
            credits=rendered.credits,
            cost_usd=self._cost_usd(rendered),
        )

    async def discard(self, job: RenderJob) -> None:
        await self._postprocess.discard(PostProcessRequest.for_job(job))

    async def _route(self, job: RenderJob) -> RoutingDecision:
        """Where this attempt runs. A managed provider's task that exists for the job already is
        resumed (polled, never created again); otherwise the router decides (and may refuse)."""
        if job.provider in MANAGED and job.provider_task_id:
            decision = RoutingDecision(job.provider, RoutingReason.RESUMED)
            if self._metrics is not None:
                await self._metrics.routed(decision.provider, decision.reason.value)
            return decision  # the job keeps the reason it was first routed for
        decision = await self._router.route(job.requested_provider)
        await self._record(job, decision)
        return decision

    async def _record(self, job: RenderJob, decision: RoutingDecision) -> None:
        await self._jobs.record_routing(job.job_id, provider=decision.provider, routing_reason=decision.reason.value)
        if self._metrics is not None:
            await self._metrics.routed(decision.provider, decision.reason.value)

    async def _run(self, provider: str, job: RenderJob, on_stage: StageCallback) -> Rendered:
        """One provider's clip, with its breaker told how the call went."""
        backend = self._router.backend(provider)
        try:
            rendered = await backend.generate(job, on_stage)
        except (JobCanceled, PermanentError):
            raise  # the job's own outcome, not a sign of a failing provider
        except Exception:
            self._router.record(provider, ok=False)
            raise
        self._router.record(provider, ok=True)
        return rendered

    def _cost_usd(self, rendered: Rendered) -> float | None:
        """What the clip cost: a provider's USD price or its credits; None: priced by GPU time."""
        if rendered.cost_usd is not None:
            return rendered.cost_usd
        if rendered.credits is not None and self._prices is not None:
            return self._prices.credits_cost(rendered.credits)
        return None
