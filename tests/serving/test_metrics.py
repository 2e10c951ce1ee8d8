"""Worker metrics aggregated in a real Redis and exported by the ingress's /metrics; JSON logs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from serving.ingress.app import create_app
from serving.keys import Keys
from serving.settings import Settings
from serving.logs import configure_logging, use_json
from serving.metrics import (
    BATCH_SIZE,
    GAUGE_TTL_S,
    GPU_MEMORY_USED,
    JOB_STAGE_SECONDS,
    OWNER_COST_USD,
    WEBHOOK_ATTEMPTS,
    WORKER_METRICS,
    MetricBatch,
    StaticCollector,
    read_worker_metrics,
)
from serving.events import SinkGroup
from serving.observability.job_metrics import JobMetrics
from serving.observability.replicas import replica_counts
from serving.observability.webhook_metrics import WebhookMetrics
from serving.types import JobStatus, QueuedJob
from serving.webhooks.store import DeliveryStatus
from serving.worker.runner import JobRunner
from tests.serving.events_helpers import SteppedBackend, new_job
from tests.serving.test_ingress import Ingress, ingress, submit_png  # noqa: F401  (fixture)
from tests.serving.test_webhooks import BOTH_SECRETS, FIRST_ATTEMPT, Env, env  # noqa: F401
from tests.serving.webhook_helpers import Receiver, running_receiver


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    found = [s.value for s in samples(text) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.fixture
def migrated_pg() -> Iterator[str]:
    """A database of this test's own: the webhook worker sweeps every pending delivery it finds,
    so deliveries that other tests left in the shared database would add to the counts here."""
    from serving.db.migrate import upgrade
    from tests.serving.db_fixtures import fresh_pg_database

    with fresh_pg_database() as url:
        upgrade(url)
        yield url


@pytest.fixture
def sync_redis(redis_url: str, unique_prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    for key in client.scan_iter(f"{unique_prefix}:*"):
        client.delete(key)
    client.close()


async def render(redis_url: str, keys: Keys) -> str:
    client = aioredis.Redis.from_url(redis_url)
    try:
        families = await read_worker_metrics(client, keys)
    finally:
        await client.aclose()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StaticCollector(families))
    return generate_latest(registry).decode()


async def test_replicas_in_many_threads_add_up_exactly(sync_redis: redis.Redis, redis_url: str, unique_prefix: str) -> None:
    keys = Keys(unique_prefix)
    start = threading.Barrier(4)

    def replica() -> None:
        client = redis.Redis.from_url(redis_url)
        start.wait(timeout=10)
        for _ in range(50):
            batch = MetricBatch(keys)
            batch.observe(JOB_STAGE_SECONDS, {"stage": "inference", "model": "m"}, 0.3)
            batch.observe(JOB_STAGE_SECONDS, {"stage": "inference", "model": "m"}, 7000.0)  # past the last bucket
            batch.inc(OWNER_COST_USD, {"owner": "acme", "provider": "local"}, 0.01)
            batch.flush(client)
        client.close()

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    text = await render(redis_url, keys)
    stage = {"stage": "inference", "model": "m"}
    assert value(text, "svd_job_stage_duration_seconds_count", **stage) == 400
    assert value(text, "svd_job_stage_duration_seconds_bucket", le="0.25", **stage) == 0
    assert value(text, "svd_job_stage_duration_seconds_bucket", le="0.5", **stage) == 200  # cumulative
    assert value(text, "svd_job_stage_duration_seconds_bucket", le="3600.0", **stage) == 200
    assert value(text, "svd_job_stage_duration_seconds_bucket", le="+Inf", **stage) == 400
    assert value(text, "svd_job_stage_duration_seconds_sum", **stage) == pytest.approx(200 * 7000.3)
    assert value(text, "svd_owner_cost_usd_total", owner="acme", provider="local") == pytest.approx(2.0)


async def test_every_metric_is_exported_with_initial_series(sync_redis: redis.Redis, redis_url: str, unique_prefix: str) -> None:
    keys = Keys(unique_prefix)
    batch = MetricBatch(keys)
    batch.set(GPU_MEMORY_USED, {"node": "n1", "device": "cpu"}, 0)
    batch.observe(BATCH_SIZE, {"model": "m"}, 1)
    batch.flush(sync_redis)
    assert sync_redis.ttl(keys.metric(GPU_MEMORY_USED.name)) > 0  # gauges of vanished replicas expire

    text = await render(redis_url, keys)
    names = {family.name for family in text_string_to_metric_families(text)}
    # prometheus' parser names counters without their `_total`
    assert names == {m.name.removesuffix("_total") for m in WORKER_METRICS}
    assert value(text, "svd_gpu_memory_used_bytes", device="cpu", node="n1") == 0
    assert value(text, "svd_generator_batch_size_bucket", model="m", le="1.0") == 1
    for outcome in ("succeeded", "retry", "failed", "disabled"):
        assert value(text, "svd_webhook_delivery_attempts_total", outcome=outcome) == 0


def test_batches_refuse_wrong_kinds_and_labels(unique_prefix: str) -> None:
    batch = MetricBatch(Keys(unique_prefix))
    with pytest.raises(TypeError):
        batch.inc(JOB_STAGE_SECONDS, {"stage": "x", "model": "m"})
    with pytest.raises(ValueError, match="takes labels"):
        batch.inc(WEBHOOK_ATTEMPTS, {"status": "ok"})
    with pytest.raises(ValueError):
        batch.inc(WEBHOOK_ATTEMPTS, {"outcome": "retry"}, -1)
    assert len(batch) == 0


def test_replica_counts_from_serve_details() -> None:
    details = {
        "applications": {
            "svd-serve": {
                "deployments": {
                    "Generator": {"target_num_replicas": 2, "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}]},
                    "Dispatcher": {"target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]},
                }
            }
        }
    }
    assert replica_counts(details, "svd-serve") == {"Generator": (2, 1), "Dispatcher": (1, 1)}
    assert replica_counts(details, "other") == {}


async def test_ingress_exports_queue_gauges_and_worker_metrics(ingress: Ingress, redis_url: str) -> None:  # noqa: F811
    for priority in ("high", "low", "low"):
        response = await submit_png(ingress, {"numFrames": "4", "priority": priority})
        assert response.status_code == 202, response.text
    batch = MetricBatch(ingress.services.keys)
    batch.observe(JOB_STAGE_SECONDS, {"stage": "end_to_end", "model": "tiny-random"}, 1.5)
    batch.flush(redis.Redis.from_url(redis_url))

    text = (await ingress.client.get("/metrics")).text
    assert value(text, "svd_queue_depth_jobs", priority="high") == 1
    assert value(text, "svd_queue_depth_jobs", priority="normal") == 0
    assert value(text, "svd_queue_depth_jobs", priority="low") == 2
    assert 0 <= value(text, "svd_queue_oldest_job_age_seconds", priority="low") < 60
    assert value(text, "svd_queue_oldest_job_age_seconds", priority="normal") == 0
    assert value(text, "svd_queue_jobs", state="waiting") == 3
    assert value(text, "svd_submissions_total", status_code="202", model="tiny-random") >= 3
    assert value(text, "svd_job_stage_duration_seconds_count", stage="end_to_end", model="tiny-random") == 1
    assert value(text, "svd_metrics_redis_up") == 1


def test_log_format_choice() -> None:
    assert use_json("production", "auto") and use_json("development", "json")
    assert not use_json("production", "console")


def test_job_log_lines_are_json_with_bound_ids(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("development", log_format="json")
    try:
        log = structlog.get_logger("t")
        with structlog.contextvars.bound_contextvars(job_id="j-1", owner_id="acme"):
            log.info("job_started", attempt=1)
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                log.exception("job_failed")
        log.info("after")
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [(e["event"], e.get("job_id"), e.get("owner_id")) for e in lines] == [
        ("job_started", "j-1", "acme"), ("job_failed", "j-1", "acme"), ("after", None, None)
    ]
    assert lines[1]["exception"][0]["exc_type"] == "RuntimeError"
    assert lines[0]["timestamp"].endswith("Z")


async def test_runner_and_webhook_worker_report_to_redis(env: Env, redis_url: str) -> None:  # noqa: F811
    runner = JobRunner(env.jobs, SteppedBackend(steps=1), env.redis, env.keys, SinkGroup(env.outbox),
                       JobMetrics(env.redis, env.keys, gpu_hour_price_usd=3600.0))  # 1 USD per GPU second
    with running_receiver(Receiver(BOTH_SECRETS, script=[500])) as receiver:
        job_id = await new_job(env.jobs, env.alice.id, webhook_url=receiver.url)
        await runner.handle(QueuedJob(job_id, env.alice.id), FIRST_ATTEMPT)
        await env.worker(metrics=WebhookMetrics(env.redis, env.keys)).start()
        await env.settled(job_id, DeliveryStatus.SUCCEEDED)
    record = await env.jobs.get(job_id)
    assert record is not None and record.status is JobStatus.COMPLETED

    text = await render(redis_url, env.keys)
    model = record.model
    assert value(text, "svd_jobs_finished_total", status="completed", model=model) == 1
    # Routing decisions are counted by the routed backend (tests/serving/test_routing.py), not
    # by the runner, which here runs a plain backend.
    for stage in ("queue_wait", "end_to_end"):
        assert value(text, "svd_job_stage_duration_seconds_count", stage=stage, model=model) == 1
    assert value(text, "svd_job_stage_duration_seconds_sum", stage="end_to_end", model=model) == pytest.approx(
        record.timings["total_s"])
    gpu_seconds = record.gpu_seconds or 0.0
    assert value(text, "svd_owner_gpu_seconds_total", owner=env.alice.id) == pytest.approx(gpu_seconds)
    assert value(text, "svd_owner_cost_usd_total", owner=env.alice.id, provider="local") == pytest.approx(gpu_seconds)
    assert value(text, "svd_webhook_delivery_attempts_total", outcome="retry") == 1
    assert value(text, "svd_webhook_delivery_attempts_total", outcome="succeeded") == 1
    assert value(text, "svd_webhook_attempt_duration_seconds_count") == 2
    assert value(text, "svd_webhook_delivery_failures_total", reason="exhausted") == 0


async def test_request_latency_is_labelled_by_route_template(ingress: Ingress) -> None:  # noqa: F811
    response = await submit_png(ingress, {"numFrames": "4"})
    job_id = response.json()["jobId"]
    await ingress.client.get(f"/api/v1/animate-image/status/{job_id}")
    text = (await ingress.client.get("/metrics")).text
    assert value(text, "svd_http_request_duration_seconds_count", method="GET",
                 route="/api/v1/animate-image/status/{job_id}") >= 1
    assert job_id not in text  # never a raw path


async def test_a_gauge_nobody_refreshes_goes_stale_alone(sync_redis: redis.Redis, redis_url: str, unique_prefix: str) -> None:
    """Two spot nodes report their GPU; one is reclaimed. Its label set leaves the export once its
    write is older than GAUGE_TTL_S, while the node that keeps refreshing stays."""
    keys = Keys(unique_prefix)
    batch = MetricBatch(keys)
    batch.set(GPU_MEMORY_USED, {"node": "gone", "device": "cuda:0"}, 7)
    batch.set(GPU_MEMORY_USED, {"node": "alive", "device": "cuda:0"}, 9)
    batch.flush(sync_redis)
    stamps = keys.metric_stamps(GPU_MEMORY_USED.name)
    gone_field = next(f for f in sync_redis.hkeys(stamps) if b"gone" in f)
    sync_redis.hset(stamps, gone_field, repr(time.time() - GAUGE_TTL_S - 1))  # written long ago
    text = await render(redis_url, keys)
    assert value(text, "svd_gpu_memory_used_bytes", node="alive", device="cuda:0") == 9
    assert not [s for f in text_string_to_metric_families(text) for s in f.samples if s.labels.get("node") == "gone"]


async def test_ingress_without_shared_metrics_exports_only_its_own(database_url: str, redis_url: str, unique_prefix: str,
                                              tmp_path: Path) -> None:
    """On Kubernetes every ingress pod is scraped: the Redis-held families there would be counted
    once per pod. With metrics_shared_on_ingress off they come from `svd-serve exporter` alone."""
    settings = Settings(data_dir=tmp_path, database_url=database_url, redis_url=redis_url, queue_name=unique_prefix,
                        key_prefix=unique_prefix, api_keys=f"a:{unique_prefix}",  # type: ignore[arg-type]
                        metrics_shared_on_ingress=False)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            text = (await client.get("/metrics")).text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "svd_submissions" in names and "svd_http_request_duration_seconds" in names
    assert not names & {"svd_queue_depth_jobs", "svd_metrics_redis_up", "svd_jobs_finished"}
