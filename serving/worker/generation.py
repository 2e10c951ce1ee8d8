"""What the Generator deployment does, without Ray: load once, then run batches of requests."""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
import structlog
from PIL import Image

from models.loading import LoadOptions
from models.registry import get_spec
from pipelines import VideoPipeline, load_pipeline
from pipelines.batch import BatchItem, batch_cost, plan_batches
from pipelines.options import EngineOptions, SizeBucket, parse_warmup_buckets, preset
from pipelines.errors import GenerationCanceled, NonFiniteOutput
from pipelines.params import VideoParams
from serving.cost import share_batch
from serving.errors import JobCanceled, PermanentError, RunHandedBack
from serving.keys import Keys
from serving.metrics import BATCH_SIZE, DENOISING_STEP_SECONDS, MetricBatch
from serving.observability.gpu import record_device
from serving.observability.tracing import job_span
from serving.progress import ProgressReport, StreamLimits, SyncProgressWriter
from serving.settings import Settings
from serving.storage import ObjectStorage, make_storage
from serving.types import GenerationRequest, GenerationResult, Stage
from serving.worker.drain import SAFETY, remaining_from_progress
from serving.worker.node_drain import DrainState

log = structlog.get_logger(__name__)

# Denoising is most of a job; the rest of the bar belongs to encoding and upload.
DENOISE_SHARE = 0.9
# How long the id of an abandoned run is kept when the run never started (so never removed it).
ABANDONED_TTL_S = 3600.0

PipelineLoader = Callable[[str, LoadOptions], VideoPipeline]


@dataclass
class _Run:
    """A run this replica holds (queued in a batch or denoising), for node-drain decisions."""

    job_id: str
    started: float  # time.monotonic()
    fraction: float = 0.0  # denoising progress 0..1


def engine_options(settings: Settings) -> EngineOptions:
    """The configured preset (`reference`, `quality`, `fast`) with the deployment's memory mode."""
    return preset(
        settings.engine_preset, memory_mode=settings.engine_memory_mode, compile_cache_dir=settings.compile_cache_dir
    )


def engine_loader(settings: Settings) -> PipelineLoader:
    def load(model: str, options: LoadOptions) -> VideoPipeline:
        return load_pipeline(get_spec(model), options, engine_options(settings))

    return load


class GenerationService:
    """Holds loaded pipelines (one per model) and runs requests, reporting progress to Redis."""

    def __init__(self, settings: Settings, loader: PipelineLoader | None = None) -> None:
        self._settings = settings
        self._loader = loader or engine_loader(settings)
        self._options = LoadOptions(
            models_dir=settings.resolved_models_dir, offline=settings.offline, device=settings.device
        )
        self._pipelines: dict[str, VideoPipeline] = {}
        self._storage: ObjectStorage = make_storage(settings)
        if not settings.redis_url:
            raise RuntimeError("REDIS_URL is not set: the generator reports progress through Redis.")
        self._redis = redis.Redis.from_url(settings.redis_url)
        self._keys = Keys(settings.key_prefix)
        self._progress = SyncProgressWriter(self._redis, self._keys, StreamLimits.from_settings(settings))
        # Runs their dispatcher gave up (run id -> when): they stop at their next step.
        self._abandoned: dict[str, float] = {}
        # Node drain (serving.worker.node_drain): runs held now, runs given back, the drain seen.
        self._runs: dict[str, _Run] = {}
        self._handed_back: set[str] = set()
        self._draining: DrainState | None = None
        self.node_id: str | None = None  # the Ray node, written beside each job's progress

    def warm_up(self, model: str) -> None:
        """Load `model` and every model named in `warmup_buckets` before the replica reports ready,
        and, when the preset compiles, compile each one's native size and its configured buckets at
        every batch size, so that no request of those sizes recompiles."""
        plan = {model: [], **parse_warmup_buckets(self._settings.warmup_buckets)}
        for name, buckets in plan.items():
            pipeline = self._pipeline(name)
            if not (pipeline.options.compile_unet or pipeline.options.compile_vae_decoder):
                continue
            spec = get_spec(name)
            native = SizeBucket(spec.native_width, spec.native_height, spec.default_num_frames)
            report = pipeline.warm_up([native, *(b for b in buckets if b != native)],
                                      max_batch_size=self._settings.max_batch_size)
            log.info("pipeline_warmed", model=name, buckets=[f"{b.width}x{b.height}x{b.num_frames}" for b in
                     report.buckets], graphs=report.graphs_compiled, seconds=round(report.seconds, 2))
        # The device gauges exist (0 on CPU) from the start, before the first job.
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        """Write the device gauges again (the Generator does on every health check): a gauge
        nobody refreshes goes stale, which is how a reclaimed node's GPU leaves the dashboard."""
        batch = MetricBatch(self._keys)
        for device in sorted({p.device for p in self._pipelines.values()}):
            record_device(batch, device)
        batch.flush(self._redis)

    def _pipeline(self, model: str) -> VideoPipeline:
        if model not in self._pipelines:
            started = time.perf_counter()
            self._pipelines[model] = self._loader(model, self._options)
            log.info("pipeline_loaded", model=model, seconds=round(time.perf_counter() - started, 2))
        return self._pipelines[model]

    def _report(self, job_id: str, step: int, steps: int, run_id: str | None = None) -> None:
        fraction = DENOISE_SHARE * step / max(steps, 1)
        run = self._runs.get(run_id) if run_id is not None else None
        if run is not None:
            run.fraction = step / max(steps, 1)
        report = ProgressReport(job_id, Stage.DENOISING.value, fraction, step, steps, node=self.node_id)
        try:
            self._progress.write(report)
        except redis.RedisError as exc:  # a missed progress report must not stop the denoising
            log.warning("progress_write_failed", job_id=job_id, error=repr(exc))

    def _record_metrics(self, model: str, device: str, step_times: list[float], batch_size: int = 1) -> None:
        batch = MetricBatch(self._keys)
        batch.observe(BATCH_SIZE, {"model": model}, batch_size)
        for seconds in step_times:
            batch.observe(DENOISING_STEP_SECONDS, {"model": model, "device": device}, seconds)
        record_device(batch, device)
        batch.flush(self._redis)

    def _canceled(self, job_id: str) -> bool:
        return bool(self._redis.exists(self._keys.cancel(job_id)))

    def abandon(self, run_id: str) -> None:
        """Stop a run at its next denoising step and free what it holds: its dispatcher handed
        the job back to the queue (drain), so its result would reach nobody. Safe to call from
        the replica's event loop while the loop runs in a thread. A run that had not started
        never starts (Ray Serve drops a cancelled request from its batch); its entry ages out."""
        now = time.monotonic()
        self._abandoned = {r: t for r, t in self._abandoned.items() if now - t < ABANDONED_TTL_S}
        self._abandoned[run_id] = now

    def _stopped(self, request: GenerationRequest) -> bool:
        return (
            request.run_id in self._abandoned
            or request.run_id in self._handed_back
            or self._canceled(request.job_id)
        )

    @property
    def accepting(self) -> bool:
        """False once this replica's node is draining: new runs belong on another node."""
        return self._draining is None

    def node_draining(self, state: DrainState) -> list[str]:
        """This replica's node is draining (called on every drain poll): stop taking runs, keep
        the runs expected to end before the deadline (with a margin), hand back the others; they
        stop at their next step and their dispatcher runs them on another node. Returns the job
        ids handed back by this call. Without a deadline every run may finish (Serve waits)."""
        self._draining = state
        left = state.seconds_left()
        if left is None:
            return []
        now = time.monotonic()
        given: list[str] = []
        for run_id, run in list(self._runs.items()):
            if run_id in self._handed_back or run_id in self._abandoned:
                continue
            remaining = remaining_from_progress(now - run.started, run.fraction)
            if remaining is None or remaining > SAFETY * left:
                self._handed_back.add(run_id)
                given.append(run.job_id)
        if given:
            log.warning("runs_handed_back", job_ids=given, seconds_left=round(left, 1))
        return given

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """One request on its own (a batch of one)."""
        outcome = self.generate_many([request])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | BaseException]:
        """Run requests in as few denoising loops as their shapes and the batch budget allow.

        Each request gets its own result or its own error: one request's bad image, cancel or
        failure never fails its batch-mates (`@serve.batch` hands this list back one by one)."""
        results: list[GenerationResult | BaseException | None] = [None] * len(requests)
        by_model: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_model.setdefault(request.params.model, []).append(index)
        for model, indices in by_model.items():
            prepared: dict[int, VideoParams] = {}
            try:
                pipeline = self._pipeline(model)
            except Exception as exc:
                for index in indices:
                    results[index] = exc
                continue
            for index in indices:
                try:
                    prepared[index] = self._video_params(requests[index])
                except Exception as exc:
                    results[index] = exc
            order = list(prepared)
            groups = plan_batches(
                [prepared[i] for i in order], self._settings.batch_max_frame_pixels, self._settings.max_batch_size
            )
            for group in groups:
                members = [order[g] for g in group]
                outcomes = self._run_group(pipeline, [requests[i] for i in members], [prepared[i] for i in members])
                for member, outcome in zip(members, outcomes, strict=True):
                    results[member] = outcome
        return [r if r is not None else RuntimeError("request was not run") for r in results]

    def _video_params(self, request: GenerationRequest) -> VideoParams:
        params = request.params
        with Image.open(io.BytesIO(self._storage.get(request.image_key))) as raw:
            image = raw.convert("RGB")
        return VideoParams(
            image=image,
            width=params.width,
            height=params.height,
            num_frames=params.num_frames,
            fps=params.fps,
            motion_bucket_id=params.motion_bucket_id,
            noise_aug_strength=params.noise_aug_strength,
            num_inference_steps=params.num_inference_steps,
            seed=params.seed,
            min_guidance_scale=params.min_guidance_scale,
            max_guidance_scale=params.max_guidance_scale,
            decode_chunk_size=params.decode_chunk_size,
        )

    def _run_group(
        self, pipeline: VideoPipeline, requests: list[GenerationRequest], params: list[VideoParams]
    ) -> list[GenerationResult | BaseException]:
        """One denoising loop for requests that share a batch key."""
        model = requests[0].params.model
        # Step durations go to Redis once the loop ends: one round trip, not one per step. The
        # first step's time also holds image encoding and latent set-up, so steps are timed from
        # one step's end to the next's, on the first request's callback (the loop is shared).
        step_times: list[float] = []
        last_step: list[float | None] = [None]

        def progress_for(request: GenerationRequest, timed: bool) -> Callable[[int, int], None]:
            def on_progress(step: int, steps: int) -> None:
                if timed:
                    now = time.perf_counter()
                    if last_step[0] is not None:
                        step_times.append(now - last_step[0])
                    last_step[0] = now
                self._report(request.job_id, step, steps, request.run_id)

            return on_progress

        items = [
            BatchItem(
                params=p,
                on_progress=progress_for(r, timed=index == 0),
                should_cancel=functools.partial(self._stopped, r),
            )
            for index, (r, p) in enumerate(zip(requests, params, strict=True))
        ]
        for request in requests:
            self._runs[request.run_id] = _Run(request.job_id, time.monotonic())
        if self._draining is not None:
            self.node_draining(self._draining)  # runs that waited for batch-mates while the drain began
        started = time.perf_counter()
        job_ids = [r.job_id for r in requests]
        try:
            with structlog.contextvars.bound_contextvars(job_ids=job_ids), \
                    job_span("generate", job_ids[0], batch_size=len(job_ids), model=model):
                outcomes = pipeline.generate_batch(items)
        except Exception as exc:  # the engine failed as a whole: every member gets the error
            if not isinstance(exc, NonFiniteOutput):
                return [exc for _ in requests]
            # A NaN video still took its GPU time: each member's share is charged with the failure.
            spent = share_batch(time.perf_counter() - started, [batch_cost(p) for p in params])
            return [PermanentError(str(exc), gpu_seconds=share) for share in spent]
        finally:
            self._record_metrics(model, pipeline.device, step_times, batch_size=len(requests))
            handed_back = {r.run_id for r in requests if r.run_id in self._handed_back}
            for request in requests:
                self._abandoned.pop(request.run_id, None)
                self._runs.pop(request.run_id, None)
                self._handed_back.discard(request.run_id)
        seconds = time.perf_counter() - started
        # A shared loop's GPU time is split by each request's share of the work.
        shares = share_batch(seconds, [batch_cost(p) for p in params])
        log.info("generation_done", model=model, batch_size=len(requests), steps=len(step_times),
                 seconds=round(seconds, 3), job_ids=job_ids)
        results: list[GenerationResult | BaseException] = []
        for request, share, outcome in zip(requests, shares, outcomes, strict=True):
            if isinstance(outcome.error, GenerationCanceled) and request.run_id in handed_back:
                results.append(RunHandedBack(f"Job {request.job_id} was handed back: node {self.node_id} is draining."))
            elif isinstance(outcome.error, GenerationCanceled):
                results.append(JobCanceled(f"Job {request.job_id} was canceled during generation."))
            elif isinstance(outcome.error, NonFiniteOutput):
                # The same weights and inputs would give the same NaNs: not worth another attempt.
                results.append(PermanentError(str(outcome.error), gpu_seconds=share))
            elif outcome.error is not None or outcome.frames is None:
                results.append(outcome.error or RuntimeError("the engine returned no frames"))
            else:
                results.append(
                    GenerationResult(
                        job_id=request.job_id,
                        frames=outcome.frames,
                        gpu_seconds=share,
                        device=pipeline.device,
                        timings={"inference_s": round(seconds, 4), "batch_size": float(len(requests))},
                    )
                )
        return results
