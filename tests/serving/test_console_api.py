"""The endpoints the console needs and the API lacked: /me, the cost estimate, the admin
overview and the full model catalogue (real Redis, PostgreSQL and SQLite, local storage)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from models.registry import get_spec
from serving.ingress.app import create_app
from serving.keys import Keys
from serving.metrics import BREAKER_OPEN, JOBS_FINISHED, REPLICAS_RUNNING, REPLICAS_WANTED, MetricBatch
from serving.security.scopes import Scope
from serving.settings import Settings
from tests.serving.test_ingress import Ingress, ingress, submit_png  # noqa: F401  (fixture)

pytestmark = pytest.mark.asyncio


async def admin_client(ingress: Ingress) -> httpx.AsyncClient:
    _, key = await ingress.services.security.api_keys.create(f"ops-{ingress.owner}", [Scope.ADMIN])
    return httpx.AsyncClient(transport=ingress.client._transport, base_url="http://testserver",
                             headers={"Authorization": f"Bearer {key}"})


async def test_me_names_the_owner_and_scopes(ingress: Ingress) -> None:
    me = await ingress.client.get("/api/v1/me")
    assert me.status_code == 200, me.text
    assert me.json() == {"ownerId": ingress.owner, "scopes": ["read", "submit"], "authDisabled": False}
    async with await admin_client(ingress) as admin:
        assert (await admin.get("/api/v1/me")).json()["scopes"] == ["admin"]
    anonymous = await ingress.client.get("/api/v1/me", headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "missing_api_key"


async def test_me_in_development_mode_says_auth_is_disabled(redis_url: str, unique_prefix: str, tmp_path: Path) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    from serving.db.migrate import upgrade

    upgrade(database)
    settings = Settings(data_dir=tmp_path, database_url=database, redis_url=redis_url, queue_name=unique_prefix,
                        key_prefix=unique_prefix, auth_disabled=True)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            me = (await client.get("/api/v1/me")).json()
    assert me == {"ownerId": "local", "scopes": ["admin", "read", "submit"], "authDisabled": True}


async def test_estimate_prices_a_submission_without_creating_it(ingress: Ingress) -> None:
    settings = ingress.services.settings
    answer = await ingress.client.post("/api/v1/estimate", json={"numFrames": 4, "numInferenceSteps": 3, "seed": 9})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = round(settings.local_job_seconds_estimate / 3600 * settings.gpu_hour_spot_price_usd, 6) \
        if settings.gpu_pricing == "spot" else round(settings.local_job_seconds_estimate / 3600 * settings.gpu_hour_price_usd, 6)
    assert body["provider"] == "local" and body["estimatedCostUsd"] == expected
    assert body["gpuSeconds"] == settings.local_job_seconds_estimate
    assert body["params"]["num_frames"] == 4 and body["params"]["seed"] == 9
    assert body["params"]["model"] == settings.default_model
    # Without a seed none is drawn; with no body at all every default applies.
    defaults = (await ingress.client.post("/api/v1/estimate")).json()
    spec = get_spec(settings.default_model)
    assert "seed" not in defaults["params"] and defaults["params"]["num_frames"] == spec.default_num_frames
    # The same submission answers the same estimate, and only the submission makes a job.
    assert await ingress.rows(ingress.owner) == 0 and await ingress.queued() == 0
    accepted = await submit_png(ingress, {"numFrames": "4", "numInferenceSteps": "3", "seed": "9"})
    assert accepted.json()["estimatedCostUsd"] == body["estimatedCostUsd"]


async def test_estimate_refuses_what_a_submission_refuses_with_the_same_message(ingress: Ingress) -> None:
    for fields in ({"numFrames": 999}, {"model": "nope"}, {"width": 100}, {"provider": "runway"}, {"bogus": 1}):
        estimate = await ingress.client.post("/api/v1/estimate", json=fields)
        submitted = await submit_png(ingress, {k: str(v) for k, v in fields.items()})
        assert estimate.status_code == submitted.status_code == 422, (fields, estimate.text)
        assert estimate.json()["code"] == submitted.json()["code"], fields
        assert estimate.json()["detail"] == submitted.json()["detail"], fields
    text = await ingress.client.post("/api/v1/estimate", content=b"numFrames=4",
                                     headers={"Content-Type": "text/plain"})
    assert text.status_code == 415
    assert await ingress.rows(ingress.owner) == 0


async def test_models_list_every_default_and_range(ingress: Ingress) -> None:
    answer = (await ingress.client.get("/api/v1/models")).json()
    tiny = next(m for m in answer["models"] if m["name"] == "tiny-random")
    spec = get_spec("tiny-random")
    assert tiny["defaultMotionBucketId"] == spec.default_motion_bucket_id
    assert tiny["defaultNoiseAugStrength"] == spec.default_noise_aug_strength
    assert tiny["defaultMinGuidanceScale"] == spec.default_min_guidance_scale
    assert tiny["defaultMaxGuidanceScale"] == spec.default_max_guidance_scale
    assert tiny["fpsRange"] == [1, 60] and tiny["motionBucketIdRange"] == [0, 1023]
    assert tiny["noiseAugStrengthRange"] == [0.0, 1.0] and tiny["guidanceScaleRange"] == [0.0, 20.0]
    assert tiny["sizeMultiple"] == 64 and tiny["stepsRange"] == [spec.min_steps, spec.max_steps]
    limits = answer["limits"]
    assert limits["outputs"] == ["mp4", "webm", "gif", "webp", "thumbnail", "frames"]
    assert limits["defaultOutputs"] == ["mp4", "thumbnail"]
    assert limits["priorities"] == ["high", "normal", "low"] and limits["defaultPriority"] == "normal"
    assert "auto" in limits["providers"] and limits["defaultProvider"] == "auto"
    assert limits["seedRange"] == [0, 2**32 - 1]
    assert limits["maxUploadBytes"] == ingress.services.settings.max_upload_bytes
    # The advertised bounds are the enforced ones: just past each edge is refused.
    for field, value in (("fps", 61), ("motionBucketId", 1024), ("noiseAugStrength", 1.5), ("seed", 2**32)):
        refused = await ingress.client.post("/api/v1/estimate", json={field: value})
        assert refused.status_code == 422, field
    for field, value in (("fps", 60), ("motionBucketId", 1023), ("noiseAugStrength", 1.0), ("seed", 2**32 - 1)):
        accepted = await ingress.client.post("/api/v1/estimate", json={field: value})
        assert accepted.status_code == 200, (field, accepted.text)


async def test_admin_overview_reads_the_redis_aggregates(ingress: Ingress) -> None:
    services = ingress.services
    for _ in range(2):
        assert (await submit_png(ingress, {"priority": "high"})).status_code == 202
    assert (await submit_png(ingress, {"priority": "low"})).status_code == 202
    # What the Dispatcher's replica watcher and the runner write (serving.observability.replicas).
    batch = MetricBatch(Keys(services.settings.key_prefix))
    batch.set(REPLICAS_WANTED, {"deployment": "Generator"}, 3)
    batch.set(REPLICAS_RUNNING, {"deployment": "Generator"}, 2)
    batch.set(BREAKER_OPEN, {"provider": "runway"}, 1)
    batch.set(BREAKER_OPEN, {"provider": "local"}, 0)
    batch.inc(JOBS_FINISHED, {"status": "completed", "model": "tiny-random"}, 3)
    batch.inc(JOBS_FINISHED, {"status": "error", "model": "tiny-random"}, 1)
    await batch.aflush(services.redis)

    refused = await ingress.client.get("/api/v1/admin/overview")
    assert refused.status_code == 403
    async with await admin_client(ingress) as admin:
        answer = await admin.get("/api/v1/admin/overview")
    assert answer.status_code == 200, answer.text
    overview = answer.json()
    assert overview["queueDepth"] == {"high": 2, "normal": 0, "low": 1, "none": 0}
    assert overview["oldestWaitS"]["high"] >= 0 and overview["oldestWaitS"]["normal"] == 0
    assert overview["generators"] == {"wanted": 3, "running": 2}
    assert overview["breakersOpen"] == {"runway": True, "local": False}
    assert overview["jobsFinished"] == {"completed": 3, "error": 1, "canceled": 0}
    assert overview["errorRate"] == 0.25
    assert overview["metricsAvailable"] is True
    # Spend comes from the jobs table (shared by other tests' owners on PostgreSQL): a job that
    # ended this month with a cost adds its cost, whoever's it is.
    from serving.types import JobStatus

    spent = (await submit_png(ingress, {"priority": "normal"})).json()["jobId"]
    await services.jobs.transition(spent, JobStatus.PROCESSING)
    await services.jobs.transition(spent, JobStatus.COMPLETED, cost_usd=0.125, gpu_seconds=30.0)
    async with await admin_client(ingress) as admin:
        after = (await admin.get("/api/v1/admin/overview")).json()["monthToDateUsd"]
    assert after == pytest.approx(overview["monthToDateUsd"] + 0.125)


async def test_an_admin_retries_another_owners_dead_letter_for_that_owner(ingress: Ingress) -> None:
    from serving.types import JobStatus

    job_id = (await submit_png(ingress, {"seed": "3"})).json()["jobId"]
    jobs = ingress.services.jobs
    # The job ran out of attempts, as the dispatcher records it.
    await jobs.transition(job_id, JobStatus.PROCESSING, attempts=3)
    await jobs.transition(job_id, JobStatus.ERROR, error_code="generation_failed", error_message="worker lost")
    await ingress.services.queue.remove(job_id)
    bob = {"Authorization": "Bearer key-bob"}
    refused = await ingress.client.post(f"/api/v1/animate-image/{job_id}/retry", headers=bob)
    assert refused.status_code == 404  # another owner's job looks missing to a plain key
    async with await admin_client(ingress) as admin:
        retried = await admin.post(f"/api/v1/animate-image/{job_id}/retry")
    assert retried.status_code == 202, retried.text
    new = await jobs.get(retried.json()["jobId"])
    assert new is not None and new.owner_id == ingress.owner and new.retry_of == job_id
    mine = (await ingress.client.get(f"/api/v1/animate-image/status/{new.id}")).json()
    assert mine["retryOf"] == job_id and mine["params"]["seed"] == 3


async def test_the_console_is_served_with_a_policy_that_allows_only_itself(ingress: Ingress) -> None:
    landing = await ingress.client.get("/")
    assert landing.status_code == 200 and 'href="/console/"' in landing.text
    redirect = await ingress.client.get("/console")
    assert redirect.status_code == 308 and redirect.headers["location"] == "/console/"
    page = await ingress.client.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    # Local storage: outputs are this ingress's signed /files URLs.
    assert policy["media-src"] == f"'self' blob: {ingress.services.settings.resolved_public_base_url}"
    # Everything the page loads ships in the package and is served here: no CDN.
    import re

    for src in re.findall(r'(?:src|href)="(static/[^"]+)"', page.text):
        asset = await ingress.client.get(f"/console/{src}")
        assert asset.status_code == 200, src
    module = await ingress.client.get("/console/static/js/app.js")
    assert module.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    imports = re.findall(r'from "\./([a-z]+\.js)"', module.text)
    assert imports
    for name in imports:
        assert (await ingress.client.get(f"/console/static/js/{name}")).status_code == 200, name
    assert "http" not in "".join(re.findall(r'(?:src|href)="([^"]+)"', page.text))
    # API answers are not pages: no page policy on them.
    assert "content-security-policy" not in (await ingress.client.get("/api/v1/me")).headers


async def test_the_policy_names_the_s3_endpoint_and_the_cdn() -> None:
    from serving.security.middleware import console_csp

    s3 = console_csp(Settings(storage_backend="s3", s3_endpoint_url="http://minio.internal:9000/bucket",
                              public_base_url="https://video.example.com"))
    assert "media-src 'self' blob: https://video.example.com http://minio.internal:9000;" in s3
    aws = console_csp(Settings(storage_backend="s3", cdn_base_url="https://cdn.example.com/v/"))
    assert "https://cdn.example.com https://*.amazonaws.com" in aws


async def test_the_new_endpoints_are_in_the_openapi_document(ingress: Ingress) -> None:
    spec = (await ingress.client.get("/openapi.json")).json()
    operations = {
        ("get", "/api/v1/me"): "getMe",
        ("post", "/api/v1/estimate"): "estimateCost",
        ("get", "/api/v1/admin/overview"): "getAdminOverview",
    }
    for (method, path), operation_id in operations.items():
        operation = spec["paths"][path][method]
        assert operation["operationId"] == operation_id
        assert operation["security"] == [{"ApiKey": []}]
    estimate_body = spec["paths"]["/api/v1/estimate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "numFrames" in estimate_body["properties"] and "imageUrl" not in estimate_body["properties"]
    assert "/console" not in spec["paths"] and "/" not in spec["paths"]
