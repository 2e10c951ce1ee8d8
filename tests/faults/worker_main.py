"""A dispatcher process for the fault-injection suite: the real QueueConsumer, JobRunner, drain,
events and webhook delivery on real Redis and PostgreSQL, with a CPU stand-in for the Ray GPU
deployments (starting Ray per process would not fit the suite's time budget on two cores).

Run as `python -m tests.faults.worker_main --run-log FILE [--step-s S] [--steps N]`; settings come
from the environment like `svd-serve worker`. A job's `metadata` steers the stand-in:
`{"fault": "crash"}` kills the process at its second step (a poison job), `{"length": k}` makes
it k times longer. Every run of a job appends "job_id pid" to the run log. SIGTERM drains.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from pathlib import Path

import redis.asyncio as aioredis

from serving.backend import StageCallback
from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRepository
from serving.keys import Keys
from serving.settings import load_settings
from serving.storage import make_storage
from serving.types import RenderJob, RenderOutcome, Stage
from serving.webhooks.services import build_worker_delivery
from serving.worker.drain import dispatcher_drainer
from serving.worker.runner import JobRunner, queue_consumer

CRASH_EXIT_CODE = 17


class SteppedBackend:
    """Denoising steps that take wall-clock time in a thread (like the GPU), with progress
    written where the Generator writes it."""

    name = "local"

    def __init__(self, jobs: JobRepository, redis: aioredis.Redis, keys: Keys, step_s: float, steps: int,
                 run_log: Path) -> None:
        self._jobs, self._redis, self._keys = jobs, redis, keys
        self._step_s, self._steps, self._run_log = step_s, steps, run_log

    async def render(self, job: RenderJob, on_stage: StageCallback) -> RenderOutcome:
        record = await self._jobs.get(job.job_id)
        assert record is not None
        fault = record.metadata.get("fault")
        steps = self._steps * int(record.metadata.get("length", 1))
        with self._run_log.open("a") as log:
            log.write(f"{job.job_id} {os.getpid()}\n")
        await on_stage(Stage.DENOISING, 0.0)
        started = time.perf_counter()
        for step in range(steps):
            if fault == "crash" and step == 1:
                os._exit(CRASH_EXIT_CODE)  # the worker dies with the job, like a CUDA crash
            await asyncio.to_thread(time.sleep, self._step_s)  # the GPU's work, off the event loop
            progress = 0.9 * (step + 1) / steps
            await self._redis.hset(self._keys.progress(job.job_id),
                                   mapping={"progress": progress, "stage": Stage.DENOISING.value})
            await on_stage(Stage.DENOISING, progress)
        return RenderOutcome(objects={}, gpu_seconds=time.perf_counter() - started, device="cpu")

    async def discard(self, job: RenderJob) -> None:
        return None


async def main(step_s: float, steps: int, run_log: Path) -> None:
    settings = load_settings()
    assert settings.redis_url
    engine = make_engine(settings.resolved_database_url)
    redis = aioredis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    sessions = make_session_factory(engine)
    jobs = JobRepository(sessions)
    delivery = build_worker_delivery(settings, sessions, make_storage(settings))
    runner = JobRunner(jobs, SteppedBackend(jobs, redis, keys, step_s, steps, run_log), redis, keys, delivery.sink)
    consumer = queue_consumer(settings, runner)  # exactly the Dispatcher's configuration
    drainer = dispatcher_drainer(consumer, jobs, redis, keys, settings.drain_grace_s)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await consumer.start()
    await delivery.start()
    print("fault worker ready", flush=True)
    await stop.wait()
    report = await drainer.drain("sigterm")
    print(f"drained finished={','.join(report.finished)} handed_back={','.join(report.handed_back)}", flush=True)
    await consumer.close(wait_for_active=False)
    await delivery.aclose()
    await redis.aclose()
    await engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-log", type=Path, required=True)
    parser.add_argument("--step-s", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.step_s, args.steps, args.run_log))
