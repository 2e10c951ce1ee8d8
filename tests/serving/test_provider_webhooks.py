"""Inbound provider webhooks over real HTTP (uvicorn on loopback), real Redis and PostgreSQL: a
loopback sender signs with the `standardwebhooks` reference package; forged, stale and replayed
calls get the right answer and change nothing; per-job-secret callbacks are re-read from a
loopback provider API before they are trusted."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from serving.ingress.app import create_app
from serving.webhooks.inbound import CallbackTokens, InboundEvent
from tests.serving.events_helpers import NEW_SECRET, OLD_SECRET, make_settings, serve

FORGER_SECRET = "whsec_bm90LXRoZS1wcm92aWRlcnMtc2VjcmV0LWF0LWFsbA=="
PATH = "/api/v1/provider/webhook"


@dataclass
class ProviderApi:
    """A provider's task API on loopback: `GET /v1/tasks/{id}` answers the task as it is."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    url: str = ""


@contextmanager
def running_provider_api(api: ProviderApi) -> Iterator[ProviderApi]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            api.requests.append(self.path)
            task = api.tasks.get(self.path.rsplit("/", 1)[-1])
            body = json.dumps(task or {"error": "not found"}).encode()
            self.send_response(200 if task else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass
class ReadFromProvider:
    """The `ProviderTaskReader` of an unsigned provider: asks its API over HTTP."""

    api: ProviderApi

    async def read_task(self, job_id: str, claimed: Mapping[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.api.url) as client:
            response = await client.get(f"/v1/tasks/{job_id}")
            response.raise_for_status()
            task: dict[str, Any] = response.json()
            return task


@dataclass
class Handled:
    events: list[InboundEvent] = field(default_factory=list)
    fail_next: bool = False

    async def __call__(self, event: InboundEvent) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the handler's database is down")
        self.events.append(event)


@dataclass
class Env:
    client: httpx.AsyncClient
    handled: Handled
    api: ProviderApi
    tokens: CallbackTokens


@pytest.fixture
async def env(migrated_pg: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> AsyncIterator[Env]:
    settings = make_settings(
        tmp_path, migrated_pg, redis_url, unique_prefix,
        provider_webhook_secrets=f"acme={NEW_SECRET} {OLD_SECRET}",
    )
    handled = Handled()
    app = create_app(settings)
    with running_provider_api(ProviderApi()) as api:
        app.state.providers.register("acme", handled)
        app.state.providers.register("plain", handled, reader=ReadFromProvider(api))
        app.state.providers.register("unsigned", handled)  # no secret, no reader: unverifiable
        with serve(app) as ingress:
            async with httpx.AsyncClient(base_url=ingress.base_url) as client:
                yield Env(client, handled, api, CallbackTokens(settings.url_signing_secret))


def signed(
    body: dict[str, Any], *, secret: str = NEW_SECRET, message_id: str | None = None, age_s: float = 0
) -> tuple[bytes, dict[str, str]]:
    """A provider's call: body bytes and Standard Webhooks headers made by the reference package."""
    raw = json.dumps(body)
    message_id = message_id or f"msg_{uuid.uuid4().hex}"
    moment = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age_s)
    signature = Webhook(secret).sign(message_id, moment, raw)
    headers = {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }
    return raw.encode(), headers


async def post(env: Env, provider: str, body: bytes, headers: dict[str, str], **params: str) -> httpx.Response:
    return await env.client.post(f"{PATH}/{provider}", content=body, headers=headers, params=params)


async def test_genuine_then_replayed_call_is_processed_once(env: Env) -> None:
    body, headers = signed({"task": "t1", "status": "SUCCEEDED"})
    first = await post(env, "acme", body, headers)
    # The provider retries the same message with a fresh timestamp and signature.
    again_body, again_headers = signed({"task": "t1", "status": "SUCCEEDED"}, message_id=headers["webhook-id"])
    again = await post(env, "acme", again_body, again_headers)
    assert first.status_code == 200 and first.json() == {"status": "processed", "deliveryId": headers["webhook-id"]}
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert [(e.delivery_id, e.payload, e.verified_by) for e in env.handled.events] == [
        (headers["webhook-id"], {"task": "t1", "status": "SUCCEEDED"}, "signature")
    ]


async def test_the_previous_secret_still_verifies_during_a_rotation(env: Env) -> None:
    body, headers = signed({"task": "t2"}, secret=OLD_SECRET)
    response = await post(env, "acme", body, headers)
    assert response.status_code == 200 and response.json()["status"] == "processed"


async def test_forged_calls_get_401_and_change_nothing(env: Env) -> None:
    body, headers = signed({"task": "t3", "status": "SUCCEEDED"}, secret=FORGER_SECRET)
    forged = await post(env, "acme", body, headers)
    tampered_body, tampered_headers = signed({"task": "t3", "status": "FAILED"})
    tampered = await post(env, "acme", tampered_body.replace(b"FAILED", b"SUCCEEDED"), tampered_headers)
    garbled = await post(env, "acme", body, {**headers, "webhook-signature": "v1,@@not-base64@@ v2,abc nonsense"})
    missing = await post(env, "acme", body, {"content-type": "application/json"})
    for response, code in (
        (forged, "webhook_signature_invalid"),
        (tampered, "webhook_signature_invalid"),
        (garbled, "webhook_signature_invalid"),
        (missing, "webhook_signature_missing"),
    ):
        assert response.status_code == 401, response.text
        assert response.json()["code"] == code
    assert env.handled.events == []
    # The forged call claimed nothing: the genuine message with that id is still processed.
    genuine_body, genuine_headers = signed({"task": "t3"}, message_id=headers["webhook-id"])
    assert (await post(env, "acme", genuine_body, genuine_headers)).json()["status"] == "processed"


async def test_stale_and_future_timestamps_get_401(env: Env) -> None:
    for age_s in (6 * 60, -6 * 60):
        body, headers = signed({"task": "t4"}, age_s=age_s)
        response = await post(env, "acme", body, headers)
        assert response.status_code == 401 and response.json()["code"] == "webhook_timestamp_out_of_range"
    body, headers = signed({"task": "t4"}, age_s=4 * 60)  # inside the tolerance
    assert (await post(env, "acme", body, headers)).status_code == 200
    assert len(env.handled.events) == 1


async def test_a_failed_handler_lets_the_retry_in(env: Env) -> None:
    env.handled.fail_next = True
    body, headers = signed({"task": "t5"})
    failed = await post(env, "acme", body, headers)
    retried = await post(env, "acme", body, headers)
    assert failed.status_code == 503 and failed.json()["code"] == "webhook_processing_failed"
    assert retried.status_code == 200 and retried.json()["status"] == "processed"
    assert len(env.handled.events) == 1


async def test_per_job_secret_callbacks_are_re_read_from_the_provider(env: Env) -> None:
    job_id = str(uuid.uuid4())
    env.api.tasks[job_id] = {"id": job_id, "status": "SUCCEEDED", "output": ["https://cdn.example/v.mp4"]}
    url = httpx.URL(env.tokens.callback_url("http://ignored", "plain", job_id))
    assert url.path == f"{PATH}/plain"
    claim = json.dumps({"id": job_id, "status": "SUCCEEDED", "output": ["https://evil.example/x.mp4"]}).encode()

    wrong = await post(env, "plain", claim, {}, job=job_id, token=env.tokens.token("plain", str(uuid.uuid4())))
    missing = await post(env, "plain", claim, {}, job=job_id)
    assert wrong.status_code == missing.status_code == 401
    assert wrong.json()["code"] == "webhook_token_invalid"
    assert env.api.requests == [] and env.handled.events == []  # nothing trusted, nothing asked

    params = dict(url.params)
    first = await post(env, "plain", claim, {}, **params)
    repeat = await post(env, "plain", claim, {}, **params)
    assert first.status_code == 200 and first.json()["status"] == "processed"
    assert repeat.status_code == 200 and repeat.json()["status"] == "duplicate"
    (event,) = env.handled.events
    assert event.verified_by == "job_secret" and event.job_id == job_id
    assert event.payload == env.api.tasks[job_id]  # what the provider says, not what the body claimed
    assert env.api.requests == [f"/v1/tasks/{job_id}"]


async def test_unknown_and_unverifiable_providers(env: Env) -> None:
    body, headers = signed({"task": "t6"})
    unknown = await post(env, "nobody", body, headers)
    unverifiable = await post(env, "unsigned", body, headers)
    assert unknown.status_code == 404
    assert unverifiable.status_code == 401 and unverifiable.json()["code"] == "webhook_unverifiable"
    assert env.handled.events == []
