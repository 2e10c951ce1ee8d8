"""The FastAPI application: clients are built in the lifespan and closed in its `finally`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import structlog
from fastapi import FastAPI

from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRepository
from serving.db.migrate import check_migrated
from serving.ingress.deps import Services
from serving.ingress.problems import install_problem_handlers
from serving.ingress.routes_jobs import router as jobs_router
from serving.ingress.routes_system import router as system_router
from serving.keys import Keys
from serving.queue import JobQueue
from serving.settings import Settings
from serving.storage import S3Storage, make_storage

log = structlog.get_logger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.redis_url:
            raise RuntimeError("REDIS_URL is not set: the ingress needs the queue's Redis.")
        engine = make_engine(settings.resolved_database_url)
        redis = aioredis.Redis.from_url(settings.redis_url)
        queue = JobQueue(settings.redis_url, settings.queue_name)
        try:
            await check_migrated(engine)  # refuse to serve on an unmigrated database
            owners = settings.api_key_owners()
            if not owners:
                log.warning("auth_disabled", reason="no API keys configured; every caller is owner 'local'")
            storage = make_storage(settings)
            if isinstance(storage, S3Storage):
                await asyncio.to_thread(storage.ensure_bucket)
            app.state.services = Services(
                settings=settings,
                engine=engine,
                jobs=JobRepository(make_session_factory(engine)),
                queue=queue,
                storage=storage,
                redis=redis,
                keys=Keys(settings.key_prefix),
                api_key_owners=owners,
            )
            log.info("ingress_started", base_url=settings.resolved_public_base_url)
            yield
        finally:
            await queue.close()
            await redis.aclose()
            await engine.dispose()

    app = FastAPI(
        title="svd-serve",
        version="0.1.0",
        description="Image-to-video with Stable Video Diffusion on your own GPUs.",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    app.include_router(jobs_router)
    app.include_router(system_router)
    return app
