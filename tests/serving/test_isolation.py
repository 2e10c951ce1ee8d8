"""The isolation matrix: two owners, every endpoint that takes a job id (found by walking the
app's routes, so an endpoint added later joins the matrix by itself), each owner's key against
the other's job -> 404 exactly like a missing job, and none of the other owner's data."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import BaseRoute

from tests.serving.test_api_keys import App, app_settings, png_bytes, running_app

MISSING = "00000000-0000-4000-8000-000000000000"


def walk_routes(routes: list[BaseRoute]) -> Iterator[BaseRoute]:
    for route in routes:
        inner = getattr(route, "original_router", None)  # routers included into the app
        if inner is not None:
            yield from walk_routes(inner.routes)
        else:
            yield route


@dataclass(frozen=True)
class Endpoint:
    method: str  # "WS" for a WebSocket route
    path: str  # with {job_id} and perhaps other parameters

    def url(self, job_id: str) -> str:
        filled = self.path.replace("{job_id}", job_id)
        return re.sub(r"\{[^}]+\}", str(uuid.uuid4()), filled)  # other ids: something that exists nowhere


def job_endpoints(app: Any) -> list[Endpoint]:
    endpoints = []
    for route in walk_routes(app.routes):
        if "{job_id}" not in getattr(route, "path", ""):
            continue
        if isinstance(route, APIWebSocketRoute):
            endpoints.append(Endpoint("WS", route.path))
        elif isinstance(route, APIRoute):
            endpoints.extend(Endpoint(m, route.path) for m in sorted(route.methods) if m != "HEAD")
        else:
            raise AssertionError(f"unclassified route with a job id: {route!r}")
    return endpoints


async def websocket_call(app: Any, path: str, key: str) -> tuple[int | None, list[dict[str, Any]]]:
    """Drives one WebSocket session through the ASGI app: returns its close code and messages."""
    inbound: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbound.put({"type": "websocket.connect"})
    sent: list[dict[str, Any]] = []
    closed = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.close":
            closed.set()

    scope = {
        "type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "http_version": "1.1",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {key}".encode())],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "subprotocols": [],
    }
    task = asyncio.create_task(app(scope, inbound.get, send))
    try:
        await asyncio.wait_for(closed.wait(), timeout=10)
    finally:
        await inbound.put({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(task, timeout=10)
    code = next((m.get("code") for m in sent if m["type"] == "websocket.close"), None)
    return code, [m for m in sent if m["type"] == "websocket.send"]


@pytest.fixture(params=["postgresql", "sqlite"])
async def app(request: pytest.FixtureRequest, redis_url: str, unique_prefix: str, tmp_path: Path) -> AsyncIterator[App]:
    from serving.db.migrate import upgrade

    url = request.getfixturevalue("pg_database_url") if request.param == "postgresql" \
        else f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    async with running_app(app_settings(url, redis_url, unique_prefix, tmp_path)) as running:
        yield running


@dataclass
class Tenant:
    owner: str
    key: str
    client: httpx.AsyncClient
    job_id: str
    marker: str  # a string only this owner's job contains


async def tenant(app: App, name: str, unique_prefix: str) -> Tenant:
    owner = f"{name}-{unique_prefix}"
    key = await app.new_key(owner)
    client = app.client(key)
    marker = f"secret-{name}-{uuid.uuid4().hex[:8]}"
    response = await client.post(
        "/api/v1/animate-image",
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"prompt": marker, "metadata": json.dumps({"note": marker})},
        headers={"Idempotency-Key": "shared-key"},
    )
    assert response.status_code == 202, response.text
    return Tenant(owner, key, client, response.json()["jobId"], marker)


def normalised(body: str, job_id: str) -> str:
    return body.replace(job_id, "<id>").replace(MISSING, "<id>")


async def call(app: App, endpoint: Endpoint, caller: Tenant, job_id: str) -> tuple[int | None, str]:
    if endpoint.method == "WS":
        code, messages = await websocket_call(app.transport.app, endpoint.url(job_id), caller.key)
        return code, json.dumps(messages)
    kwargs: dict[str, Any] = {"json": {}} if endpoint.method in ("POST", "PUT", "PATCH") else {}
    response = await caller.client.request(endpoint.method, endpoint.url(job_id), timeout=10, **kwargs)
    return response.status_code, response.text


async def test_isolation_matrix(app: App, unique_prefix: str) -> None:
    alice = await tenant(app, "alice", unique_prefix)
    bob = await tenant(app, "bob", unique_prefix)
    endpoints = job_endpoints(app.transport.app)
    paths = {e.path for e in endpoints}
    # The endpoints this matrix must at least cover; new ones join automatically.
    assert {"/api/v1/animate-image/status/{job_id}", "/api/v1/animate-image/{job_id}"} <= paths
    try:
        for caller, victim in ((bob, alice), (alice, bob)):
            for endpoint in endpoints:
                foreign_status, foreign_body = await call(app, endpoint, caller, victim.job_id)
                missing_status, missing_body = await call(app, endpoint, caller, MISSING)
                malformed_status, _ = await call(app, endpoint, caller, "not-a-uuid")
                expected = 4404 if endpoint.method == "WS" else 404
                assert foreign_status == missing_status == malformed_status == expected, endpoint
                assert normalised(foreign_body, victim.job_id) == normalised(missing_body, victim.job_id), endpoint
                assert victim.marker not in foreign_body and victim.owner not in foreign_body, endpoint

            listing = (await caller.client.get("/api/v1/animate-image")).json()
            assert [job["jobId"] for job in listing["jobs"]] == [caller.job_id]
            assert victim.marker not in json.dumps(listing)
            # The same Idempotency-Key names a different job for each owner.
            again = await caller.client.post(
                "/api/v1/animate-image",
                files={"image": ("a.png", png_bytes(), "image/png")},
                data={"prompt": caller.marker, "metadata": json.dumps({"note": caller.marker})},
                headers={"Idempotency-Key": "shared-key"},
            )
            assert again.status_code == 200 and again.json()["jobId"] == caller.job_id

        # The victim's job is untouched by all of that (no cancel, no retry went through).
        for owner in (alice, bob):
            own = await owner.client.get(f"/api/v1/animate-image/status/{owner.job_id}")
            assert own.status_code == 200 and own.json()["status"] == "queued"
            assert own.json()["prompt"] == owner.marker
    finally:
        await alice.client.aclose()
        await bob.client.aclose()
