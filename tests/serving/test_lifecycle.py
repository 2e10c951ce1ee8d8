"""One owner for a job's lifecycle: the submission's undo steps, the ingress's changes counted
like the runner's, and one writer of progress (real Redis, real PostgreSQL and SQLite)."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from serving.keys import PROGRESS_TTL_S, Keys
from serving.metrics import read_worker_metrics
from serving.progress import ProgressReport, ProgressWriter, StreamLimits, SyncProgressWriter
from tests.serving.test_ingress import Ingress, ingress, submit_png  # noqa: F401  (fixture)


async def test_a_failed_enqueue_undoes_the_row_and_the_input(ingress: Ingress) -> None:  # noqa: F811
    # A real Redis fault: BullMQ's add script INCRs the queue's id counter, which now holds text,
    # so the add fails after the input and the row were written.
    await ingress.services.redis.set(f"bull:{ingress.services.settings.queue_name}:id", "not-a-number")
    response = await submit_png(ingress)
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "queue_unavailable"
    assert await ingress.rows(ingress.owner) == 0
    assert await ingress.stored_objects() == []
    await ingress.services.redis.delete(f"bull:{ingress.services.settings.queue_name}:id")
    # The same submission goes through once the queue works again.
    assert (await submit_png(ingress)).status_code == 202
    assert await ingress.rows(ingress.owner) == 1 and len(await ingress.stored_objects()) == 1


async def test_a_cancel_at_the_ingress_is_announced_and_counted(ingress: Ingress) -> None:  # noqa: F811
    job_id = (await submit_png(ingress)).json()["jobId"]
    assert (await ingress.client.delete(f"/api/v1/animate-image/{job_id}")).status_code == 200
    families = await read_worker_metrics(ingress.services.redis, ingress.services.keys)
    finished = {(s.labels["status"], s.labels["model"]): s.value for f in families for s in f.samples
                if s.name == "svd_jobs_finished_total"}
    assert finished.get(("canceled", ingress.services.settings.default_model)) == 1.0
    # Another owner's job, a missing job and a malformed id answer the same 404.
    other = await ingress.client.get(f"/api/v1/animate-image/status/{job_id}",
                                     headers={"Authorization": "Bearer key-bob"})
    assert other.status_code == 404 and other.json()["code"] == "not_found"


async def test_the_generator_and_the_runner_write_progress_the_same_way(redis_url: str, unique_prefix: str) -> None:
    keys = Keys(unique_prefix)
    limits = StreamLimits(ttl_s=600, max_len=50)
    sync_client = redis.Redis.from_url(redis_url)
    async_client = aioredis.Redis.from_url(redis_url)
    try:
        SyncProgressWriter(sync_client, keys, limits).write(ProgressReport("g", "denoising", 0.45, 5, 10, node="n1"))
        await ProgressWriter(async_client, keys, limits).write(ProgressReport("r", "denoising", 0.45, 5, 10, node="n1"))
        for job in ("g", "r"):
            assert sync_client.hgetall(keys.progress(job)) == {
                b"progress": b"0.4500", b"stage": b"denoising", b"step": b"5", b"steps": b"10", b"node": b"n1"
            }
            assert 0 < sync_client.ttl(keys.progress(job)) <= PROGRESS_TTL_S
            assert 0 < sync_client.ttl(keys.events(job)) <= 600
            ((_, fields),) = sync_client.xrange(keys.events(job))
            assert fields[b"type"] == b"progress"
        # A stage report without a step keeps the hash's shape (the step fields of the last
        # denoising report stay until overwritten) and adds one event.
        await ProgressWriter(async_client, keys, limits).write(ProgressReport("r", "encoding", 0.92))
        assert sync_client.hget(keys.progress("r"), "stage") == b"encoding"
        assert sync_client.xlen(keys.events("r")) == 2
    finally:
        sync_client.delete(*(k for j in ("g", "r") for k in (keys.progress(j), keys.events(j))))
        sync_client.close()
        await async_client.aclose()
