"""Schemathesis against our OpenAPI document, over real HTTP to a uvicorn server on loopback
(real Redis, SQLite, local storage): no 5xx, responses conform to the schema (status codes,
content types, bodies, headers), and authentication is not ignored. Examples are bounded so
that `make test` stays quick; `SCHEMATHESIS_MAX_EXAMPLES`-style tuning is not needed for CI."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from serving.db.migrate import upgrade
from serving.ingress.app import create_app
from serving.security.scopes import Scope
from serving.settings import Settings
from tests.conftest import REDIS_URL

MAX_EXAMPLES = 25  # per operation; enough to find the classes of failure we fixed, fast in CI


class ServerThread:
    """uvicorn serving the app on 127.0.0.1 in a thread with its own event loop."""

    def __init__(self, settings: Settings) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.base_url = f"http://127.0.0.1:{port}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self.server.serve())
        finally:
            self.loop.close()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        ready = threading.Event()
        for _ in range(200):  # polls the started flag, bounded to ~20 s
            if self.server.started:
                ready.set()
                break
            if not self._thread.is_alive():
                break
            ready.wait(0.1)
        assert self.server.started, "uvicorn did not start"
        return self

    def run(self, coro: object) -> object:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    import uuid

    data = tmp_path_factory.mktemp("schemathesis")
    database = f"sqlite+aiosqlite:///{data / 'jobs.db'}"
    upgrade(database)
    prefix = f"st{uuid.uuid4().hex[:8]}"
    settings = Settings(
        data_dir=data, database_url=database, redis_url=REDIS_URL, queue_name=prefix, key_prefix=prefix,
        storage_dir=data / "storage", max_upload_bytes=256 * 1024, url_fetch_timeout_s=2,
        # Fuzzing sends hundreds of requests: limits would turn most answers into 429s.
        # The failed-authentication limit too: `ignored_auth` sends invalid keys on purpose.
        rate_limit_per_s=0, auth_failure_rate_per_s=0, max_concurrent_jobs=0, max_jobs_per_day=0,
    )
    with ServerThread(settings) as running:
        try:
            yield running
        finally:
            running.run(running.app.state.services.queue.obliterate())


@pytest.fixture(scope="module")
def api_key(server: ServerThread) -> str:
    security = server.app.state.services.security
    _, key = server.run(security.api_keys.create("fuzzer", [Scope.ADMIN]))  # type: ignore[misc]
    return key  # type: ignore[has-type]


# The document does not depend on the settings, so it is read from an app that is never started;
# the cases then go over HTTP to the running server. (Schemathesis' lazy fixture loader does not
# work with pytest 9, whose nodes lost the private `_nodeid` it rewrites.)
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: schemathesis.Case, server: ServerThread, api_key: str) -> None:
    case.call_and_validate(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {api_key}"},
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            response_headers_conformance,
            ignored_auth,
            # Invalid input (schemathesis' negative cases) is refused with a 4xx, and a method the
            # document does not list answers 405 with an `Allow` header.
            negative_data_rejection,
            unsupported_method,
        ],
        timeout=15,
    )


def test_the_schema_declares_bearer_auth_on_every_api_operation(server: ServerThread) -> None:
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http", "scheme": "bearer", "description": "An API key from `svd-serve keys create`."
    }
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if path.startswith("/api/v1/") and not path.startswith("/api/v1/provider/"):
                assert operation.get("security") == [{"ApiKey": []}], (method, path)
                assert "401" in operation["responses"] and "429" in operation["responses"], (method, path)


def test_every_operation_has_a_stable_camel_case_id_and_a_tag() -> None:
    """Generated clients (openapi-generator, openapi-typescript, Orval) name methods after these."""
    import re

    spec = create_app(Settings()).openapi()
    ids = {
        (method.upper(), path): operation["operationId"]
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "responses" in operation
    }
    assert all(re.fullmatch(r"[a-z][A-Za-z]*", op) for op in ids.values()), ids
    assert len(set(ids.values())) == len(ids), "operation ids are unique"
    api = "/api/v1/animate-image"
    assert {
        ("POST", api): "submitJob",
        ("GET", api): "listJobs",
        ("GET", f"{api}/status/{{job_id}}"): "getJob",
        ("DELETE", f"{api}/{{job_id}}"): "cancelJob",
        ("POST", f"{api}/{{job_id}}/retry"): "retryJob",
        ("GET", f"{api}/{{job_id}}/events"): "streamJobEvents",
        ("GET", "/api/v1/models"): "listModels",
    }.items() <= ids.items()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if isinstance(operation, dict) and "responses" in operation:
                assert operation.get("tags"), (method, path)
