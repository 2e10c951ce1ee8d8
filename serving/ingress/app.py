"""The FastAPI application: clients are built in the lifespan and closed in its `finally`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from serving.cost import Budgets, CostLedger
from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRepository
from serving.db.migrate import check_migrated
from serving.ingress.deps import Services
from serving.ingress.operation_ids import operation_id
from serving.ingress.problems import install_problem_docs, install_problem_handlers
from serving.ingress.routes_account import router as account_router
from serving.ingress.routes_admin import router as admin_router
from serving.ingress.routes_console import install_console
from serving.ingress.routes_events import router as events_router
from serving.ingress.routes_jobs import router as jobs_router
from serving.ingress.routes_system import router as system_router
from serving.ingress.routes_usage import router as usage_router
from serving.ingress.routes_webhooks import provider_router as provider_webhooks_router
from serving.ingress.routes_webhooks import router as webhooks_router
from serving.keys import Keys
from serving.observability.http_metrics import install_http_metrics
from serving.observability.tracing import setup_observability
from serving.queue import JobQueue
from serving.redis_clients import command_client
from serving.security.middleware import install_security_middleware
from serving.security.setup import build_security, require_a_key_source
from serving.settings import Settings
from serving.storage import S3Storage, make_storage
from serving.providers.callbacks import Closer, register_provider_webhooks
from serving.webhooks.budget_alerts import BudgetWebhook, build_budget_webhook
from serving.webhooks.inbound import ProviderRegistry
from serving.webhooks.services import DeliveryServices, build_delivery_services

log = structlog.get_logger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.redis_url:
            raise RuntimeError("REDIS_URL is not set: the ingress needs the queue's Redis.")
        engine = make_engine(settings.resolved_database_url)
        redis = command_client(settings.redis_url)
        queue = JobQueue(settings.redis_url, settings.queue_name)
        delivery: DeliveryServices | None = None
        closers: list[Closer] = []
        budget_webhook: BudgetWebhook | None = None
        try:
            await check_migrated(engine)  # refuse to serve on an unmigrated database
            setup_observability(settings, "api")  # tracing / Sentry, when configured
            owners = settings.api_key_owners()
            if settings.auth_disabled:
                log.warning("auth_disabled", reason="no API keys checked; every caller is owner 'local'")
            storage = make_storage(settings)
            if isinstance(storage, S3Storage):
                await asyncio.to_thread(storage.ensure_bucket)
            sessions = make_session_factory(engine)
            keys = Keys(settings.key_prefix)
            delivery = build_delivery_services(settings, sessions, storage, app.state.providers)
            closers = register_provider_webhooks(app.state.providers, settings, JobRepository(sessions), redis, keys)
            budget_webhook = build_budget_webhook(settings, redis, keys)
            app.state.services = Services(
                settings=settings,
                engine=engine,
                sessions=sessions,
                jobs=JobRepository(sessions),
                queue=queue,
                storage=storage,
                redis=redis,
                keys=keys,
                api_key_owners=owners,
                budgets=Budgets(settings, CostLedger(sessions), budget_webhook),
                delivery=delivery,
                security=build_security(settings, sessions, redis, keys),
            )
            await require_a_key_source(settings, app.state.services.security.api_keys)
            log.info("ingress_started", base_url=settings.resolved_public_base_url)
            yield
        finally:
            for close in closers:
                await close()
            if delivery is not None:
                await delivery.aclose()
            if budget_webhook is not None:
                await budget_webhook.aclose()
            await queue.close()
            await redis.aclose()
            await engine.dispose()

    app = FastAPI(
        title="svd-serve",
        version="0.1.0",
        description="Image-to-video with Stable Video Diffusion on your own GPUs.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    # Provider callback handlers (fal's registered at start-up, serving.providers.callbacks).
    app.state.providers = ProviderRegistry()
    install_problem_handlers(app)
    install_security_middleware(app, settings)
    install_http_metrics(app)
    install_problem_docs(app)
    app.include_router(jobs_router)
    app.include_router(system_router)
    app.include_router(events_router)
    app.include_router(webhooks_router)
    app.include_router(provider_webhooks_router)
    app.include_router(admin_router)
    app.include_router(usage_router)
    app.include_router(account_router)
    install_console(app)
    return app
