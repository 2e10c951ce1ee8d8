"""The HTTP ingress on real Redis, real PostgreSQL/SQLite and local storage (no Ray needed:
these tests look at what a submission leaves behind, not at generation)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from serving.ingress.app import create_app
from serving.ingress.deps import Services
from serving.queue import QueueConsumer
from serving.settings import Settings
from serving.types import JobStatus

pytestmark = pytest.mark.asyncio


def png_bytes(size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (200, 30, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Ingress:
    client: httpx.AsyncClient
    services: Services
    storage_dir: Path
    owner: str  # the owner behind the client's key; unique per test (the PG database is shared)

    async def stored_files(self) -> list[Path]:
        """Every file the local storage holds (objects and their metadata sidecars)."""
        return [p for p in self.storage_dir.rglob("*") if p.is_file()] if self.storage_dir.exists() else []

    async def stored_objects(self) -> list[Path]:
        objects = self.storage_dir / "objects"
        return [p for p in objects.rglob("*") if p.is_file()] if objects.exists() else []

    async def queued(self) -> int:
        counts = await self.services.queue.counts()
        return sum(counts.values())

    async def rows(self, owner: str) -> int:
        records, _ = await self.services.jobs.list_for_owner(owner, limit=100)
        return len(records)


@pytest.fixture
async def ingress(database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> AsyncIterator[Ingress]:
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        redis_url=redis_url,
        queue_name=unique_prefix,
        key_prefix=unique_prefix,
        api_keys=f"alice-{unique_prefix}:key-alice,bob-{unique_prefix}:key-bob",  # type: ignore[arg-type]
        storage_dir=tmp_path / "storage",
        allow_private_urls=True,  # test_accepts_json_image_url serves its image on loopback
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers={"Authorization": "Bearer key-alice"}
        ) as client:
            yield Ingress(client, app.state.services, tmp_path / "storage", f"alice-{unique_prefix}")
        await app.state.services.queue.obliterate()


async def submit_png(ingress: Ingress, data: dict[str, str] | None = None, image: bytes | None = None) -> httpx.Response:
    return await ingress.client.post(
        "/api/v1/animate-image", files={"image": ("in.png", image or png_bytes(), "image/png")}, data=data or {}
    )


async def test_accepts_multipart_and_reports_status(ingress: Ingress) -> None:
    response = await submit_png(ingress, {"numFrames": "4", "seed": "7", "priority": "high", "metadata": '{"a": 1}'})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert body["statusUrl"].endswith(f"/api/v1/animate-image/status/{body['jobId']}")
    assert body["eventsUrl"].endswith(f"/api/v1/animate-image/{body['jobId']}/events")

    status = (await ingress.client.get(f"/api/v1/animate-image/status/{body['jobId']}")).json()
    assert status["status"] == "queued"
    assert status["queuePosition"] == 0
    assert status["params"]["num_frames"] == 4 and status["params"]["seed"] == 7
    assert status["metadata"] == {"a": 1}
    assert status["resultUrl"] is None and status["progress"] == 0
    assert len(await ingress.stored_objects()) == 1
    assert await ingress.queued() == 1


async def test_accepts_json_base64(ingress: Ingress) -> None:
    payload = {"imageBase64": base64.b64encode(png_bytes()).decode(), "model": "tiny-random", "fps": 8}
    response = await ingress.client.post("/api/v1/animate-image", json=payload)
    assert response.status_code == 202, response.text


async def test_accepts_json_image_url(ingress: Ingress) -> None:
    image = png_bytes()
    # A real HTTP server on loopback serves the image; the ingress fetches it over HTTP.
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Serve(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Serve)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
        response = await ingress.client.post("/api/v1/animate-image", json={"imageUrl": url})
        assert response.status_code == 202, response.text
        assert len(await ingress.stored_objects()) == 1
    finally:
        server.shutdown()
        server.server_close()


BAD_INPUTS = [
    ("unknown model", {"model": "sdxl-turbo"}, None, 422, "unknown_model"),
    ("too many frames", {"numFrames": "99"}, None, 422, "invalid_num_frames"),
    ("too few frames", {"numFrames": "1"}, None, 422, "invalid_num_frames"),
    ("too many steps", {"numInferenceSteps": "500"}, None, 422, "invalid_num_inference_steps"),
    ("zero steps", {"numInferenceSteps": "0"}, None, 422, "invalid_num_inference_steps"),
    ("width not multiple of 64", {"width": "100"}, None, 422, "invalid_size"),
    ("height not multiple of 64", {"height": "72"}, None, 422, "invalid_size"),
    ("size out of range", {"width": "2048"}, None, 422, "invalid_size"),
    ("not an image", {}, b"%PDF-1.4 this is not an image", 422, "invalid_image"),
    ("truncated png", {}, png_bytes()[:60], 422, "invalid_image"),
    ("empty file", {}, b"", 422, "empty_image"),
    ("bad priority", {"priority": "urgent"}, None, 422, "invalid_input"),
    ("unknown field", {"colour": "red"}, None, 422, "invalid_input"),
    ("guidance inverted", {"minGuidanceScale": "3", "maxGuidanceScale": "1"}, None, 422, "invalid_guidance"),
]


@pytest.mark.parametrize("case,fields,image,status,code", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
async def test_bad_multipart_input_leaves_nothing(
    ingress: Ingress, case: str, fields: dict[str, str], image: bytes | None, status: int, code: str
) -> None:
    if image is None:
        response = await submit_png(ingress, fields)
    else:
        response = await ingress.client.post(
            "/api/v1/animate-image", files={"image": ("in.png", image, "image/png")}, data=fields
        )
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["code"] == code
    assert problem["status"] == status and problem["detail"]
    assert await ingress.stored_files() == []
    assert await ingress.queued() == 0
    assert await ingress.rows(ingress.owner) == 0


BAD_JSON = [
    ("empty object", {}, 422, "empty_body"),
    ("neither image source", {"model": "tiny-random"}, 422, "missing_image"),
    ("both image sources", {"imageUrl": "http://127.0.0.1:1/x.png", "imageBase64": "aGVsbG8="}, 422, "invalid_image_source"),
    ("base64 garbage", {"imageBase64": "!!!not base64!!!"}, 422, "invalid_image"),
    ("base64 of text", {"imageBase64": base64.b64encode(b"hello world").decode()}, 422, "invalid_image"),
    ("url not http", {"imageUrl": "file:///etc/passwd"}, 422, "invalid_image_url"),
    ("url unreachable", {"imageUrl": "http://127.0.0.1:1/x.png"}, 422, "image_fetch_failed"),
]


@pytest.mark.parametrize("case,payload,status,code", BAD_JSON, ids=[c[0] for c in BAD_JSON])
async def test_bad_json_input_leaves_nothing(ingress: Ingress, case: str, payload: dict[str, str], status: int, code: str) -> None:
    response = await ingress.client.post("/api/v1/animate-image", json=payload)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert await ingress.stored_files() == []
    assert await ingress.queued() == 0
    assert await ingress.rows(ingress.owner) == 0


async def test_empty_body_and_wrong_content_type(ingress: Ingress) -> None:
    empty = await ingress.client.post("/api/v1/animate-image")
    assert empty.status_code == 422 and empty.json()["code"] == "empty_body"
    empty_json = await ingress.client.post("/api/v1/animate-image", content=b"", headers={"content-type": "application/json"})
    assert empty_json.status_code == 422 and empty_json.json()["code"] == "empty_body"
    text = await ingress.client.post("/api/v1/animate-image", content=b"hello", headers={"content-type": "text/plain"})
    assert text.status_code == 415 and text.json()["code"] == "unsupported_media_type"
    no_file = await ingress.client.post("/api/v1/animate-image", data={"model": "tiny-random"}, files={"x": ("a", b"b")})
    assert no_file.status_code == 422 and no_file.json()["code"] == "missing_image"
    assert await ingress.stored_files() == [] and await ingress.queued() == 0 and await ingress.rows(ingress.owner) == 0


async def test_auth_and_owner_isolation(ingress: Ingress) -> None:
    anonymous = await ingress.client.post("/api/v1/animate-image", headers={"Authorization": ""}, json={})
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "missing_api_key"
    wrong = await ingress.client.get("/api/v1/animate-image", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["code"] == "invalid_api_key"

    job_id = (await submit_png(ingress)).json()["jobId"]
    bob = {"Authorization": "Bearer key-bob"}
    theirs = await ingress.client.get(f"/api/v1/animate-image/status/{job_id}", headers=bob)
    missing = await ingress.client.get("/api/v1/animate-image/status/00000000-0000-0000-0000-000000000000", headers=bob)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["code"] == missing.json()["code"] == "not_found"
    assert (await ingress.client.delete(f"/api/v1/animate-image/{job_id}", headers=bob)).status_code == 404
    assert (await ingress.client.get("/api/v1/animate-image", headers=bob)).json()["jobs"] == []


async def test_list_pages_with_cursor(ingress: Ingress) -> None:
    ids = [(await submit_png(ingress)).json()["jobId"] for _ in range(5)]
    seen: list[str] = []
    cursor = None
    for _ in range(3):
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await ingress.client.get("/api/v1/animate-image", params=params)).json()
        seen.extend(job["jobId"] for job in page["jobs"])
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    bad = await ingress.client.get("/api/v1/animate-image", params={"cursor": "garbage"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_cursor"


async def test_cancel_queued_job_removes_it_from_the_queue(ingress: Ingress) -> None:
    job_id = (await submit_png(ingress)).json()["jobId"]
    assert await ingress.queued() == 1
    response = await ingress.client.delete(f"/api/v1/animate-image/{job_id}")
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    assert await ingress.queued() == 0
    again = await ingress.client.delete(f"/api/v1/animate-image/{job_id}")
    assert again.status_code == 409 and again.json()["code"] == "job_finished"


async def test_idempotency_key_returns_the_same_job(ingress: Ingress) -> None:
    headers = {"Idempotency-Key": "order-17"}
    first = await ingress.client.post("/api/v1/animate-image", files={"image": ("a.png", png_bytes())}, headers=headers)
    second = await ingress.client.post("/api/v1/animate-image", files={"image": ("a.png", png_bytes())}, headers=headers)
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["jobId"] == second.json()["jobId"]
    assert await ingress.queued() == 1 and await ingress.rows(ingress.owner) == 1


async def test_models_health_ready_metrics_docs(ingress: Ingress) -> None:
    models = (await ingress.client.get("/api/v1/models")).json()
    names = {m["name"]: m for m in models["models"]}
    assert {"svd", "svd-xt", "svd-xt-1-1", "tiny-random"} <= set(names)
    assert names["tiny-random"]["randomWeights"] is True and "random" in names["tiny-random"]["description"].lower()
    assert names["svd"]["defaultNumFrames"] == 14 and names["svd-xt"]["defaultNumFrames"] == 25
    assert (await ingress.client.get("/healthz")).json() == {"status": "ok"}
    ready = await ingress.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "database": "ok"}
    await submit_png(ingress, {"model": "nope"})
    metrics = (await ingress.client.get("/metrics")).text
    assert 'svd_submissions_total{model="unknown",status_code="422"}' in metrics
    docs = await ingress.client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = (await ingress.client.get("/openapi.json")).json()
    assert "/api/v1/animate-image" in spec["paths"]


async def test_unknown_route_is_problem_json(ingress: Ingress) -> None:
    response = await ingress.client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert json.loads(response.text)["code"] == "not_found"


async def test_method_not_allowed_says_what_is_allowed(ingress: Ingress) -> None:
    """405 carries `Allow` with every method of the path (RFC 9110), also where two routes share it."""
    expected = {
        "/api/v1/animate-image": "GET, POST",  # the list (GET) and the submission (POST)
        "/api/v1/animate-image/status/0b9a3c1e-1f7e-4a8e-9a51-8d7c6b5a4f3e": "GET",
        "/api/v1/admin/dead-letter": "GET",
        "/healthz": "GET",
        "/openapi.json": "GET, HEAD",  # a Starlette route: it serves HEAD too
    }
    for path, allow in expected.items():
        for method in ("PUT", "PATCH", "TRACE"):
            response = await ingress.client.request(method, path)
            assert response.status_code == 405, (method, path, response.text)
            assert response.headers["allow"] == allow, (method, path)
            assert response.json()["code"] == "method_not_allowed"
    job = await ingress.client.request("PUT", "/api/v1/animate-image/0b9a3c1e-1f7e-4a8e-9a51-8d7c6b5a4f3e")
    assert job.status_code == 405 and job.headers["allow"] == "DELETE"


@pytest.mark.parametrize("query", ["limit=1.0", "limit=+5", "limit=%205", "limit=5%20", "limit=1e1", "limit=0x10",
                                   "limit=0", "limit=101", "limit=", "limit=abc", "limit=%00"])
async def test_malformed_page_limits_are_refused(ingress: Ingress, query: str) -> None:
    listed = await ingress.client.get(f"/api/v1/animate-image?{query}")
    assert listed.status_code == 422 and listed.json()["code"] == "invalid_input", listed.text
    admin = ingress.services.security.api_keys
    _, key = await admin.create(f"ops-{ingress.owner}", ["admin"])
    letters = await ingress.client.get(f"/api/v1/admin/dead-letter?{query}", headers={"Authorization": f"Bearer {key}"})
    assert letters.status_code == 422 and letters.json()["code"] == "invalid_input", letters.text
    fine = await ingress.client.get("/api/v1/admin/dead-letter?limit=7", headers={"Authorization": f"Bearer {key}"})
    assert fine.status_code == 200


async def test_a_nul_in_a_query_that_reaches_the_store_is_refused(ingress: Ingress) -> None:
    _, key = await ingress.services.security.api_keys.create(f"ops-{ingress.owner}", ["admin"])
    response = await ingress.client.get("/api/v1/admin/dead-letter?owner=a%00b", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 422 and "NUL" in response.json()["detail"], response.text


async def test_readyz_reports_queue_consumers_without_depending_on_them(ingress: Ingress) -> None:
    """The ingress stays ready with no worker (the queue is the buffer while the GPU cluster is
    down) and says how many dispatchers consume its queue."""

    async def consumers() -> int | None:
        ready = await ingress.client.get("/readyz")
        assert ready.status_code == 200
        return ready.json()["worker"]["consumers"]

    async def until(expected: int) -> None:
        async with asyncio.timeout(30):
            while await consumers() != expected:
                await asyncio.sleep(0.05)  # polling a state, bounded by the timeout

    assert await consumers() == 0

    async def handler(*_: object) -> None:
        return None

    settings = ingress.services.settings
    dispatcher = QueueConsumer(settings.redis_url or "", settings.queue_name, handler)
    await dispatcher.start()
    try:
        await until(1)
    finally:
        await dispatcher.close()
    await until(0)


async def test_a_prompt_on_a_local_job_is_reported_unused(ingress: Ingress) -> None:
    async def status_of(data: dict[str, str]) -> dict[str, Any]:
        accepted = await submit_png(ingress, data)
        assert accepted.status_code == 202, accepted.text
        return (await ingress.client.get(f"/api/v1/animate-image/status/{accepted.json()['jobId']}")).json()

    local = await status_of({"prompt": "a cat surfing", "provider": "local"})
    assert local["prompt"] == "a cat surfing"
    assert [w["code"] for w in local["warnings"]] == ["prompt_unused"]
    assert local["warnings"][0]["message"].startswith("The prompt was not used: local Stable Video Diffusion")
    assert (await status_of({"provider": "local"}))["warnings"] == []

    # `auto` may still go to a provider that reads the prompt: no warning until it is routed locally.
    auto = await status_of({"prompt": "a cat surfing"})
    assert auto["warnings"] == []
    await ingress.services.jobs.transition(auto["jobId"], JobStatus.PROCESSING, provider="local",
                                           routing_reason="default")  # what the dispatcher records
    routed = (await ingress.client.get(f"/api/v1/animate-image/status/{auto['jobId']}")).json()
    assert [w["code"] for w in routed["warnings"]] == ["prompt_unused"]
