"""Outbound webhooks on real PostgreSQL, real Redis and real HTTP receivers on loopback: Standard
Webhooks signatures checked by the reference verifier (also during a secret rotation), retries
that keep one webhook-id, 410 Gone, Retry-After, redirects, replay, a hanging receiver that
cannot delay a job, and one outcome webhook per job."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
import json
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from PIL import Image

from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRepository
from serving.events import SinkGroup
from serving.ingress.app import create_app
from serving.keys import Keys
from serving.queue import ConsumedJobInfo
from serving.settings import Settings
from serving.storage import make_storage
from serving.types import JobStatus, QueuedJob
from serving.webhooks.delivery import DeliveryWorker
from serving.webhooks.outbox import WebhookOutbox, storage_url_signer
from serving.webhooks.schedule import RETRY_SCHEDULE_S, RetryPolicy, parse_retry_after
from serving.webhooks.scheduler import DueDeliveries
from serving.webhooks.signing import WebhookSigner, parse_secrets
from serving.webhooks.store import DeliveryRecord, DeliveryStatus, WebhookStore
from serving.webhooks.urlpolicy import webhook_client
from serving.worker.runner import JobRunner
from tests.serving.events_helpers import (
    NEW_SECRET,
    OLD_SECRET,
    Owner,
    SteppedBackend,
    make_settings,
    new_job,
    owners,
    serve,
    wait_until,
)
from tests.serving.webhook_helpers import Receiver, running_receiver

FIRST_ATTEMPT = ConsumedJobInfo(attempt=1, max_attempts=3)
BOTH_SECRETS = {"old": OLD_SECRET, "new": NEW_SECRET}


@dataclass
class Env:
    settings: Settings
    jobs: JobRepository
    store: WebhookStore
    due: DueDeliveries
    outbox: WebhookOutbox
    http: httpx.AsyncClient
    alice: Owner
    bob: Owner
    redis: aioredis.Redis
    keys: Keys
    workers: list[DeliveryWorker]

    def worker(self, **overrides: Any) -> DeliveryWorker:
        options: dict[str, Any] = {
            "policy": RetryPolicy(time_scale=self.settings.webhook_time_scale, jitter=0.1, rng=random.Random(7)),
            "timeout_s": self.settings.webhook_timeout_s,
            "poll_interval_s": self.settings.webhook_poll_interval_s,
        }
        options.update(overrides)
        worker = DeliveryWorker(
            self.store, self.due, WebhookSigner(parse_secrets(self.settings.webhook_secrets)), self.http, **options
        )
        self.workers.append(worker)
        return worker

    def runner(self) -> JobRunner:
        return JobRunner(self.jobs, SteppedBackend(steps=1), self.redis, self.keys, SinkGroup(self.outbox))

    async def finished_job(self, url: str, owner: Owner | None = None) -> str:
        """A job that completes through a real JobRunner whose sink is the outbox."""
        job_id = await new_job(self.jobs, (owner or self.alice).id, webhook_url=url)
        runner = self.runner()
        await runner.handle(QueuedJob(job_id, (owner or self.alice).id), FIRST_ATTEMPT)
        return job_id

    async def delivery_of(self, job_id: str) -> DeliveryRecord:
        pairs = await self.store.list_for_job(job_id)
        assert len(pairs) == 1
        return pairs[0][0]

    async def settled(self, job_id: str, status: DeliveryStatus, timeout: float = 10) -> DeliveryRecord:
        async def check() -> DeliveryRecord | None:
            pairs = await self.store.list_for_job(job_id)
            return pairs[0][0] if pairs and pairs[0][0].status is status else None

        result: DeliveryRecord = await wait_until(check, timeout=timeout)
        return result


@pytest.fixture
async def env(migrated_pg: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> AsyncIterator[Env]:
    settings = make_settings(tmp_path, migrated_pg, redis_url, unique_prefix)
    engine = make_engine(migrated_pg)
    client = aioredis.Redis.from_url(redis_url)
    keys = Keys(unique_prefix)
    store = WebhookStore(make_session_factory(engine))
    due = DueDeliveries(client, keys)
    storage = make_storage(settings)
    outbox = WebhookOutbox(store, due, public_base_url=settings.resolved_public_base_url,
                           sign_url=storage_url_signer(storage, 600))
    http = webhook_client(settings)
    alice, bob = owners(unique_prefix)
    environment = Env(
        settings, JobRepository(make_session_factory(engine)), store, due, outbox, http, alice, bob, client, keys, []
    )
    try:
        yield environment
    finally:
        for worker in environment.workers:
            await worker.close()
        await http.aclose()
        await client.aclose()
        await engine.dispose()


async def test_signed_retried_with_one_id_and_verified_across_a_rotation(env: Env) -> None:
    with running_receiver(Receiver(BOTH_SECRETS, script=[500, 500, 500])) as receiver:
        job_id = await env.finished_job(receiver.url)
        await env.worker().start()
        delivery = await env.settled(job_id, DeliveryStatus.SUCCEEDED)

        with serve(create_app(env.settings)) as ingress:
            async with httpx.AsyncClient(base_url=ingress.base_url) as client:
                listed = await client.get(f"/api/v1/animate-image/{job_id}/webhooks", headers=env.alice.headers)
                foreign = await client.get(f"/api/v1/animate-image/{job_id}/webhooks", headers=env.bob.headers)

    assert len(receiver.received) == 4
    assert receiver.ids == [delivery.id] * 4 and delivery.id.startswith("msg_")
    # Signed with the new and the old secret: receivers on either one verify every attempt.
    assert all(r.verified_by == ["old", "new"] for r in receiver.received)
    assert all(len(r.headers["webhook-signature"].split()) == 2 for r in receiver.received)
    payload = json.loads(receiver.received[-1].body)
    assert payload["type"] == "job.completed" and payload["data"]["jobId"] == job_id
    assert payload["data"]["status"] == "completed"
    assert payload["data"]["resultUrl"].startswith(env.settings.resolved_public_base_url + "/files/")
    assert payload["data"]["statusUrl"].endswith(f"/api/v1/animate-image/status/{job_id}")
    # Every attempt sends the same message (the id and the body are one message).
    assert len({r.body for r in receiver.received}) == 1

    assert listed.status_code == 200, listed.text
    (entry,) = listed.json()["deliveries"]
    assert entry["deliveryId"] == delivery.id and entry["status"] == "succeeded" and entry["attempts"] == 4
    log = entry["attemptLog"]
    assert [a["statusCode"] for a in log] == [500, 500, 500, 200]
    assert [a["outcome"] for a in log] == ["retry", "retry", "retry", "succeeded"]
    assert [a["error"] for a in log] == ["HTTP 500", "HTTP 500", "HTTP 500", None]
    assert all(a["latencyMs"] > 0 for a in log)
    assert foreign.status_code == 404


async def test_a_late_retry_carries_links_signed_again(env: Env) -> None:
    """Download links in a payload live `presign_ttl_s`; a retry after half of that sends the same
    message (same webhook-id, same fields) with the links signed again, signed and verifiable."""
    ttl_s = 600
    outbox = WebhookOutbox(env.store, env.due, public_base_url=env.settings.resolved_public_base_url,
                           sign_url=storage_url_signer(make_storage(env.settings), ttl_s), jobs=env.jobs,
                           url_ttl_s=ttl_s)
    with running_receiver(Receiver(BOTH_SECRETS)) as receiver:
        job_id = await env.finished_job(receiver.url)
        recorded = await env.delivery_of(job_id)
        # An early retry resends the recorded bytes exactly.
        assert await outbox.body_for_attempt(recorded) == recorded.payload
        # The same delivery 20 minutes on, its recorded links long past half their life (made
        # unmistakable here: a link that no longer works).
        stale_body = json.loads(recorded.payload)
        stale_body["data"]["resultUrl"] = "http://expired.invalid/video.mp4"
        late = dataclasses.replace(recorded, payload=json.dumps(stale_body),
                                   created_at=recorded.created_at - dt.timedelta(minutes=20))
        await env.worker(body_for=outbox.body_for_attempt).send(late)

    (received,) = receiver.received
    assert received.headers["webhook-id"] == recorded.id and received.verified_by == ["old", "new"]
    sent = json.loads(received.body)
    link = httpx.URL(sent["data"]["resultUrl"])
    assert str(link).startswith(env.settings.resolved_public_base_url + "/files/")
    assert int(link.params["expires"]) >= time.time() + ttl_s - 5  # valid for a full lifetime again
    fresh = {k: v for k, v in sent["data"].items() if k not in ("resultUrl", "thumbnailUrl")}
    assert fresh == {k: v for k, v in stale_body["data"].items() if k not in ("resultUrl", "thumbnailUrl")}
    assert sent["type"] == stale_body["type"] and sent["timestamp"] == stale_body["timestamp"]
    # What the API shows as the delivery's payload is still the recorded one.
    assert (await env.delivery_of(job_id)).payload == recorded.payload


async def test_sweep_records_the_webhook_of_a_job_that_ended_without_one(env: Env) -> None:
    """An ingress killed between a cancel's status change and its outbox leaves a canceled job
    with no delivery: the delivery loop's sweep records it, once; nothing else is touched."""
    outbox = WebhookOutbox(env.store, env.due, public_base_url=env.settings.resolved_public_base_url,
                           sign_url=storage_url_signer(make_storage(env.settings), 600), jobs=env.jobs,
                           url_ttl_s=600)
    with running_receiver(Receiver(BOTH_SECRETS)) as receiver:
        lost = await new_job(env.jobs, env.alice.id, webhook_url=receiver.url)
        await env.jobs.transition(lost, JobStatus.CANCELED)  # ...and the process died here
        silent = await new_job(env.jobs, env.alice.id)  # no webhook URL: nothing to announce
        await env.jobs.transition(silent, JobStatus.CANCELED)
        announced = await env.finished_job(receiver.url)  # its delivery was recorded as usual
        recorded = await env.delivery_of(announced)

        await env.worker(recover=lambda: outbox.recover_unannounced(settle=dt.timedelta(0))).start()
        delivery = await env.settled(lost, DeliveryStatus.SUCCEEDED)
        assert await outbox.recover_unannounced(settle=dt.timedelta(0)) == 0  # nothing left to find

    assert delivery.event_type == "job.canceled"
    assert json.loads(delivery.payload)["data"]["status"] == "canceled"
    assert receiver.ids.count(delivery.id) == 1
    assert await env.store.list_for_job(silent) == []
    assert (await env.delivery_of(announced)).id == recorded.id  # still its one delivery
    # A job that ended a moment ago is left to the process that ended it.
    late = await new_job(env.jobs, env.alice.id, webhook_url=receiver.url)
    await env.jobs.transition(late, JobStatus.CANCELED)
    assert await outbox.recover_unannounced() == 0 and await env.store.list_for_job(late) == []


async def test_gone_disables_the_endpoint_until_a_replay(env: Env) -> None:
    with running_receiver(Receiver(BOTH_SECRETS, script=[410])) as receiver:
        await env.worker().start()
        first = await env.finished_job(receiver.url)
        gone = await env.settled(first, DeliveryStatus.DISABLED)
        assert gone.attempts == 1 and gone.last_status_code == 410
        second = await env.finished_job(receiver.url)
        skipped = await env.settled(second, DeliveryStatus.DISABLED)
        assert skipped.attempts == 0 and len(receiver.received) == 1  # nothing more was sent

        with serve(create_app(env.settings)) as ingress:
            async with httpx.AsyncClient(base_url=ingress.base_url) as client:
                path = f"/api/v1/animate-image/{second}/webhooks/{skipped.id}/replay"
                refused = await client.post(path, headers=env.bob.headers)
                wrong_job = await client.post(
                    f"/api/v1/animate-image/{first}/webhooks/{skipped.id}/replay", headers=env.alice.headers
                )
                replayed = await client.post(path, headers=env.alice.headers)
            delivered = await env.settled(second, DeliveryStatus.SUCCEEDED)

    assert refused.status_code == 404 and wrong_job.status_code == 404
    assert replayed.status_code == 202, replayed.text
    assert replayed.json()["deliveryId"] == skipped.id and replayed.json()["status"] == "pending"
    assert receiver.ids == [gone.id, skipped.id]  # the replay repeats the message id
    assert delivered.attempts == 1 and delivered.delivered_at is not None


async def test_a_hanging_receiver_never_delays_the_job(env: Env) -> None:
    hang = threading.Event()
    with running_receiver(Receiver(BOTH_SECRETS, hang=hang)) as receiver:
        await env.worker(timeout_s=0.5).start()
        job_id = await new_job(env.jobs, env.alice.id, webhook_url=receiver.url)
        started = time.monotonic()
        await asyncio.wait_for(env.runner().handle(QueuedJob(job_id, env.alice.id), FIRST_ATTEMPT), timeout=5)
        job = await env.jobs.get(job_id)
        assert job is not None and job.status is JobStatus.COMPLETED
        assert time.monotonic() - started < 5

        async def timed_out_once() -> bool:
            return bool([a for a in await env.store.attempts((await env.delivery_of(job_id)).id) if a.error])

        await wait_until(timed_out_once)
        hang.set()
    attempt = (await env.store.attempts((await env.delivery_of(job_id)).id))[0]
    assert attempt.status_code is None and attempt.error == "No answer within 0.5 s."
    assert attempt.latency_ms is not None and attempt.latency_ms >= 500


async def test_retry_after_is_honoured_and_redirects_are_not_followed(env: Env) -> None:
    worker = env.worker(policy=RetryPolicy(time_scale=0.01, jitter=0.0))
    with (
        running_receiver(Receiver(BOTH_SECRETS)) as target,
        running_receiver(Receiver(BOTH_SECRETS, script=[(503, {"Retry-After": "120"})])) as busy,
    ):
        job_id = await env.finished_job(busy.url)
        delivery = await env.delivery_of(job_id)
        before = time.time()
        after_503 = await worker.deliver(delivery.id)
        assert after_503 is not None and after_503.status is DeliveryStatus.PENDING
        assert after_503.next_attempt_at is not None
        # The schedule says 5 s (x0.01 = 0.05 s); the receiver asked for 120 s (x0.01 = 1.2 s).
        wait = after_503.next_attempt_at.timestamp() - before
        assert 1.2 <= wait < 2.0
        due_at = await env.due.when(delivery.id)
        assert due_at is not None and abs(due_at - after_503.next_attempt_at.timestamp()) < 0.01

        with running_receiver(Receiver(BOTH_SECRETS, default=(302, {"Location": target.url}))) as redirector:
            moved = await env.finished_job(redirector.url)
            redirected = await worker.deliver((await env.delivery_of(moved)).id)
        assert redirected is not None and redirected.status is DeliveryStatus.PENDING
        assert redirected.last_status_code == 302 and "redirects are not followed" in (redirected.last_error or "")
        assert target.received == []


async def test_the_schedule_runs_out_and_one_webhook_per_job(env: Env) -> None:
    with running_receiver(Receiver(BOTH_SECRETS, default=500)) as receiver:
        job_id = await env.finished_job(receiver.url)
        # The job's queue entry comes back (its worker died after finishing): nothing new is sent.
        await env.runner().handle(QueuedJob(job_id, env.alice.id), FIRST_ATTEMPT)
        record = await env.jobs.get(job_id)
        assert record is not None
        await env.outbox.enqueue(record)
        await env.worker(policy=RetryPolicy(time_scale=0.0001, schedule=(0.0, 5.0, 300.0))).start()
        failed = await env.settled(job_id, DeliveryStatus.FAILED)
    assert failed.attempts == 3 and failed.next_attempt_at is None
    assert len(receiver.received) == 3 and len(set(receiver.ids)) == 1
    assert len(await env.store.list_for_job(job_id)) == 1
    assert await env.due.when(failed.id) is None


async def test_the_sweep_reschedules_deliveries_redis_lost(env: Env) -> None:
    with running_receiver(Receiver(BOTH_SECRETS)) as receiver:
        job_id = await env.finished_job(receiver.url)
        delivery = await env.delivery_of(job_id)
        await env.due.done(delivery.id)  # Redis forgot it
        await env.worker().start()  # the loop sweeps the database when it starts
        await env.settled(job_id, DeliveryStatus.SUCCEEDED)
    assert receiver.ids == [delivery.id]


def test_retry_schedule_with_jitter_and_scale() -> None:
    assert RETRY_SCHEDULE_S == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    policy = RetryPolicy(time_scale=1.0, jitter=0.1, rng=random.Random(1))
    assert policy.delay_before(0) == 0.0
    for index, base in enumerate(RETRY_SCHEDULE_S[1:], start=1):
        delay = policy.delay_before(index)
        assert delay is not None and 0.9 * base <= delay <= 1.1 * base
    assert policy.delay_before(len(RETRY_SCHEDULE_S)) is None
    assert RetryPolicy(time_scale=0.001, jitter=0).delay_before(2) == pytest.approx(0.3)
    assert RetryPolicy(jitter=0).delay_before(1, retry_after_s=60) == 60
    assert RetryPolicy(jitter=0).delay_before(1, retry_after_s=10**9) == 36000  # capped


def test_parse_retry_after() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    assert parse_retry_after("120") == 120
    assert parse_retry_after("Thu, 01 Jan 2026 12:01:30 GMT", now) == 90
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 230)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("overrides", "url", "code"),
    [
        ({"allow_private_urls": False}, "http://169.254.169.254/latest/meta-data", "unsafe_url"),
        ({"allow_private_urls": False}, "http://127.0.0.1:9/hook", "unsafe_url"),
        ({}, "ftp://example.com/hook", "unsafe_url"),
        ({"webhook_secrets": ""}, "http://127.0.0.1:9/hook", "webhooks_not_configured"),
    ],
)
async def test_submission_refuses_a_bad_webhook_url(
    env: Env, tmp_path: Path, unique_prefix: str, overrides: dict[str, Any], url: str, code: str
) -> None:
    settings = make_settings(tmp_path, env.settings.database_url or "", env.settings.redis_url or "", unique_prefix,
                             **overrides)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver",
                                     headers=env.alice.headers) as client:
            response = await client.post(
                "/api/v1/animate-image", files={"image": ("a.png", png_bytes(), "image/png")}, data={"webhookUrl": url}
            )
            listed, _ = await app.state.services.jobs.list_for_owner(env.alice.id)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert listed == []


async def test_an_owner_default_webhook_url_applies_when_the_request_names_none(
    env: Env, tmp_path: Path, unique_prefix: str
) -> None:
    default = "http://127.0.0.1:9/owner-default"
    settings = make_settings(tmp_path, env.settings.database_url or "", env.settings.redis_url or "", unique_prefix,
                             owner_webhook_urls={env.alice.id: default})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver",
                                     headers=env.alice.headers) as client:
            plain = await client.post("/api/v1/animate-image", files={"image": ("a.png", png_bytes(), "image/png")})
            own = await client.post(
                "/api/v1/animate-image",
                files={"image": ("a.png", png_bytes(), "image/png")},
                data={"webhookUrl": "http://127.0.0.1:9/explicit"},
            )
            jobs = app.state.services.jobs
            defaulted = await jobs.get(plain.json()["jobId"])
            explicit = await jobs.get(own.json()["jobId"])
        await app.state.services.queue.obliterate()
    assert plain.status_code == own.status_code == 202
    assert defaulted is not None and defaulted.webhook_url == default
    assert explicit is not None and explicit.webhook_url == "http://127.0.0.1:9/explicit"
