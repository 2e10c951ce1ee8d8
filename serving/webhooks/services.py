"""Events and webhooks wired together, for the ingress (lifespan) and the Dispatcher replica."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import redis.asyncio as aioredis
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from serving.db.jobs import JobRepository
from serving.events import EventStore, JobEventSink, SinkGroup, StreamEventSink
from serving.keys import Keys
from serving.redis_clients import blocking_client, command_client
from serving.settings import Settings
from serving.storage import ObjectStorage
from serving.webhooks.delivery import DeliveryWorker
from serving.webhooks.inbound import CallbackTokens, InboundWebhooks, ProviderRegistry, parse_provider_secrets
from serving.webhooks.outbox import WebhookOutbox, storage_url_signer
from serving.webhooks.schedule import RetryPolicy
from serving.webhooks.scheduler import DueDeliveries
from serving.webhooks.signing import WebhookSigner, parse_secrets
from serving.webhooks.store import WebhookStore
from serving.webhooks.urlpolicy import webhook_client
from serving.observability.webhook_metrics import WebhookMetrics

log = structlog.get_logger(__name__)


@dataclass
class DeliveryServices:
    """What the ingress needs for live events and webhooks."""

    events: EventStore
    notifier: JobEventSink  # job status changes -> event stream + outcome webhook
    webhooks: WebhookStore
    due: DueDeliveries
    inbound: InboundWebhooks
    tokens: CallbackTokens
    heartbeat_s: float
    redis: aioredis.Redis  # quick commands of events and webhooks
    # Followers' blocking XREADs, each held for up to `heartbeat_s`: their own connections, with
    # a read timeout that outlasts the block (serving.redis_clients).
    event_reader: aioredis.Redis

    async def aclose(self) -> None:
        await self.event_reader.aclose()
        await self.redis.aclose()


def _event_store(
    settings: Settings, client: aioredis.Redis, keys: Keys, reader: aioredis.Redis | None = None
) -> EventStore:
    return EventStore(client, keys, ttl_s=settings.events_ttl_s, max_len=settings.events_max_len, reader=reader)


def _outbox(settings: Settings, client: aioredis.Redis, keys: Keys, sessions: async_sessionmaker[AsyncSession],
            storage: ObjectStorage) -> tuple[WebhookStore, DueDeliveries, WebhookOutbox]:
    store = WebhookStore(sessions)
    due = DueDeliveries(client, keys)
    outbox = WebhookOutbox(
        store,
        due,
        public_base_url=settings.resolved_public_base_url,
        sign_url=storage_url_signer(storage, settings.presign_ttl_s),
        jobs=JobRepository(sessions),
        url_ttl_s=settings.presign_ttl_s,
    )
    return store, due, outbox


def build_delivery_services(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    storage: ObjectStorage,
    registry: ProviderRegistry,
) -> DeliveryServices:
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set: events and webhooks live in Redis.")
    # Malformed secrets stop the start-up, rather than failing submissions or callbacks later.
    parse_secrets(settings.webhook_secrets)
    provider_secrets = parse_provider_secrets(settings.provider_webhook_secrets)
    keys = Keys(settings.key_prefix)
    client = command_client(settings.redis_url)
    reader = blocking_client(settings.redis_url, block_s=settings.events_heartbeat_s)
    events = _event_store(settings, client, keys, reader)
    store, due, outbox = _outbox(settings, client, keys, sessions, storage)
    tokens = CallbackTokens(settings.url_signing_secret)
    inbound = InboundWebhooks(
        client,
        keys,
        registry,
        signing_secrets=provider_secrets,
        tokens=tokens,
        tolerance_s=settings.provider_webhook_tolerance_s,
    )
    return DeliveryServices(
        events=events,
        notifier=SinkGroup(StreamEventSink(events), outbox),
        webhooks=store,
        due=due,
        inbound=inbound,
        tokens=tokens,
        heartbeat_s=settings.events_heartbeat_s,
        redis=client,
        event_reader=reader,
    )


@dataclass
class WorkerDelivery:
    """What the Dispatcher replica runs: the runner's event sink and the webhook delivery loop."""

    sink: JobEventSink
    worker: DeliveryWorker | None  # None without signing secrets: nothing can be sent
    http: httpx.AsyncClient | None
    redis: aioredis.Redis

    async def start(self) -> None:
        if self.worker is not None:
            await self.worker.start()

    async def aclose(self) -> None:
        if self.worker is not None:
            await self.worker.close()
        if self.http is not None:
            await self.http.aclose()
        await self.redis.aclose()


def build_worker_delivery(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], storage: ObjectStorage
) -> WorkerDelivery:
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set: events and webhooks live in Redis.")
    keys = Keys(settings.key_prefix)
    client = command_client(settings.redis_url)  # publishes events; the dispatcher never follows
    events = _event_store(settings, client, keys)
    store, due, outbox = _outbox(settings, client, keys, sessions, storage)
    secrets = parse_secrets(settings.webhook_secrets)
    worker, http = None, None
    if secrets:
        http = webhook_client(settings)
        worker = DeliveryWorker(
            store,
            due,
            WebhookSigner(secrets),
            http,
            policy=RetryPolicy(time_scale=settings.webhook_time_scale, jitter=settings.webhook_jitter),
            timeout_s=settings.webhook_timeout_s,
            concurrency=settings.webhook_concurrency,
            poll_interval_s=settings.webhook_poll_interval_s,
            metrics=WebhookMetrics(client, keys),
            body_for=outbox.body_for_attempt,
            recover=outbox.recover_unannounced,
        )
    else:
        log.warning("webhooks_disabled", reason="SVD_SERVE_WEBHOOK_SECRETS is empty; no webhook is sent")
    return WorkerDelivery(sink=SinkGroup(StreamEventSink(events), outbox), worker=worker, http=http, redis=client)
