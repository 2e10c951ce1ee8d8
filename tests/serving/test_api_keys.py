"""API keys end to end: stored hashed, found by prefix, scoped, revocable; 401/403 over real HTTP
(ASGI) on PostgreSQL and SQLite; the CLI prints a key once; dev mode only when asked for."""

from __future__ import annotations

import json

import contextlib
import io
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from PIL import Image
from pydantic import ValidationError
from sqlalchemy import text

from serving.db.engine import make_engine, make_session_factory
from serving.db.migrate import upgrade
from serving.errors import InvalidInput, NotFound
from serving.ingress.app import create_app
from serving.ingress.deps import Services
from serving.security.api_keys import ApiKeyRepository, hash_key, key_prefix
from serving.security.scopes import Scope
from serving.settings import Settings
from tests.serving.db_fixtures import fresh_pg_database, sqlite_url


def png_bytes(size: tuple[int, int] = (96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class App:
    """A running ingress (lifespan entered) and a way to call it over ASGI."""

    services: Services
    transport: httpx.ASGITransport
    storage_dir: Path

    def client(self, key: str | None = None, **headers: str) -> httpx.AsyncClient:
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.AsyncClient(transport=self.transport, base_url="http://testserver", headers=headers)

    async def new_key(self, owner: str, *scopes: Scope) -> str:
        _, key = await self.services.security.api_keys.create(owner, scopes or (Scope.SUBMIT, Scope.READ))
        return key

    def stored_objects(self) -> list[Path]:
        objects = self.storage_dir / "objects"
        return [p for p in objects.rglob("*") if p.is_file()] if objects.exists() else []

    async def queued(self) -> int:
        return sum((await self.services.queue.counts()).values())


def app_settings(database_url: str, redis_url: str, prefix: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "database_url": database_url,
        "redis_url": redis_url,
        "queue_name": prefix,
        "key_prefix": prefix,
        "storage_dir": tmp_path / "storage",
        **overrides,
    }
    return Settings(**values)


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[App]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        try:
            yield App(app.state.services, httpx.ASGITransport(app=app), settings.resolved_storage_dir)
        finally:
            await app.state.services.queue.obliterate()


@pytest.fixture
async def ingress(database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> AsyncIterator[App]:
    async with running_app(app_settings(database_url, redis_url, unique_prefix, tmp_path)) as app:
        yield app


async def submit(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/api/v1/animate-image", files={"image": ("a.png", png_bytes(), "image/png")})


# The repository ------------------------------------------------------------------------------


async def test_keys_are_random_shown_once_and_stored_hashed(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        repo = ApiKeyRepository(make_session_factory(engine))
        owner = f"owner-{uuid.uuid4().hex[:8]}"
        record, key = await repo.create(owner, [Scope.SUBMIT, Scope.READ], name="ci")
        other_record, other = await repo.create(owner, ["read"])
        assert key != other and key.startswith("svd_") and len(key) > 50
        assert key_prefix(key) == record.prefix and record.scopes == {Scope.SUBMIT, Scope.READ}
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT * FROM api_keys WHERE owner_id = :o"), {"o": owner})).all()
        stored = " ".join(str(value) for row in rows for value in row)
        assert key not in stored and other not in stored and key.split("_", 2)[2] not in stored  # the secret may hold "_"
        assert hash_key(key) in stored  # what is kept is the hash

        assert (await repo.authenticate(key)) == record
        assert (await repo.authenticate(other)).scopes == {Scope.READ}  # type: ignore[union-attr]
        forged = f"svd_{record.prefix}_{'A' * 43}"  # right prefix, wrong secret
        for bad in (forged, key[:-1], key + "x", "svd_zz_1", "", "not-a-key"):
            assert await repo.authenticate(bad) is None, bad

        revoked = await repo.revoke(record.prefix)
        assert revoked.revoked_at is not None and await repo.authenticate(key) is None
        assert (await repo.revoke(record.id)).revoked_at == revoked.revoked_at  # idempotent, by id too
        assert [r.id for r in await repo.list_keys(owner)] == [other_record.id]
        assert {r.id for r in await repo.list_keys(owner, include_revoked=True)} == {record.id, other_record.id}
        with pytest.raises(NotFound):
            await repo.revoke("ffffffffffff")
        with pytest.raises(InvalidInput, match="Unknown scope"):
            await repo.create(owner, ["superuser"])
        with pytest.raises(InvalidInput):
            await repo.create("", ["read"])
    finally:
        await engine.dispose()


# Over HTTP -----------------------------------------------------------------------------------


async def test_missing_invalid_and_revoked_keys_answer_401(ingress: App, unique_prefix: str) -> None:
    key = await ingress.new_key(f"alice-{unique_prefix}")
    async with ingress.client() as anonymous, ingress.client("svd_0123456789ab_" + "x" * 43) as forged, \
            ingress.client(key) as alice, ingress.client(**{"Authorization": f"Basic {key}"}) as basic:
        for client, code in ((anonymous, "missing_api_key"), (forged, "invalid_api_key"), (basic, "missing_api_key")):
            for method, path in (("GET", "/api/v1/animate-image"), ("GET", "/api/v1/models"),
                                 ("POST", "/api/v1/animate-image")):
                response = await client.request(method, path)
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["code"] == code
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.headers["content-type"].startswith("application/problem+json")
        assert (await alice.get("/api/v1/animate-image")).status_code == 200
        await ingress.services.security.api_keys.revoke(key_prefix(key) or "")
        after = await alice.get("/api/v1/animate-image")
        assert after.status_code == 401 and after.json()["code"] == "invalid_api_key"
        # Health, readiness, metrics and the docs stay open (probes and scrapers carry no key).
        for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
            assert (await anonymous.get(path)).status_code == 200, path


async def test_scopes_answer_403(ingress: App, unique_prefix: str) -> None:
    owner = f"carol-{unique_prefix}"
    reader = await ingress.new_key(owner, Scope.READ)
    submitter = await ingress.new_key(owner, Scope.SUBMIT)
    admin = await ingress.new_key(owner, Scope.ADMIN)
    async with ingress.client(reader) as r, ingress.client(submitter) as s, ingress.client(admin) as a:
        refused = await submit(r)
        assert refused.status_code == 403 and refused.json()["code"] == "insufficient_scope"
        assert "insufficient_scope" in refused.headers["www-authenticate"]
        assert ingress.stored_objects() == [] and await ingress.queued() == 0

        job_id = (await submit(s)).json()["jobId"]
        assert (await s.get(f"/api/v1/animate-image/status/{job_id}")).status_code == 403
        assert (await s.get("/api/v1/animate-image")).status_code == 403
        assert (await r.get(f"/api/v1/animate-image/status/{job_id}")).status_code == 200
        assert (await r.get("/api/v1/models")).status_code == 200
        assert (await r.delete(f"/api/v1/animate-image/{job_id}")).status_code == 403  # cancel is `submit`

        assert (await a.get(f"/api/v1/animate-image/status/{job_id}")).status_code == 200  # admin: everything
        assert (await a.delete(f"/api/v1/animate-image/{job_id}")).json()["status"] == "canceled"
        assert (await submit(a)).status_code == 202


async def test_static_bootstrap_keys_still_work(database_url: str, redis_url: str, unique_prefix: str,
                                                tmp_path: Path) -> None:
    settings = app_settings(database_url, redis_url, unique_prefix, tmp_path,
                            api_keys=f"boot-{unique_prefix}:bootstrap-key-123")
    async with running_app(settings) as app, app.client("bootstrap-key-123") as client:
        accepted = await submit(client)
        assert accepted.status_code == 202
        status = await client.get(f"/api/v1/animate-image/status/{accepted.json()['jobId']}")
        assert status.status_code == 200
        record = await app.services.jobs.get(accepted.json()["jobId"])
        assert record is not None and record.owner_id == f"boot-{unique_prefix}"


async def test_auth_disabled_only_when_asked_and_never_in_production(
    database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    # Development without the flag: keys are required even when none exist anywhere.
    async with running_app(app_settings(database_url, redis_url, unique_prefix, tmp_path)) as app:
        async with app.client() as anonymous:
            assert (await anonymous.get("/api/v1/animate-image")).status_code == 401
    with structlog.testing.capture_logs() as logs:
        settings = app_settings(database_url, redis_url, unique_prefix, tmp_path, auth_disabled=True)
        async with running_app(settings) as app, app.client() as anonymous:
            accepted = await submit(anonymous)
            assert accepted.status_code == 202
            record = await app.services.jobs.get(accepted.json()["jobId"])
            assert record is not None and record.owner_id == "local"
    assert any(entry["event"] == "auth_disabled" and entry["log_level"] == "warning" for entry in logs)
    with pytest.raises(ValidationError, match="AUTH_DISABLED"):
        Settings(environment="production", url_signing_secret="s3cret-value", api_keys="a:b",  # type: ignore[arg-type]
                 auth_disabled=True)


@pytest.fixture(params=["postgresql", "sqlite"])
def keyless_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database that holds no API key yet."""
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            url = stack.enter_context(fresh_pg_database())
        else:
            url = sqlite_url(tmp_path / "keyless.db")
        upgrade(url)
        yield url


async def test_production_starts_on_database_keys_alone_and_never_without_a_key(
    keyless_database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    """The first admin key comes from `svd-serve keys create`, no static key needed."""
    settings = app_settings(keyless_database_url, redis_url, unique_prefix, tmp_path, environment="production",
                            url_signing_secret="s3cret-value")
    with pytest.raises(RuntimeError, match="No API key exists: set SVD_SERVE_API_KEYS or create one"):
        async with running_app(settings):
            pass
    # The bootstrap Job (k8s/jobs/bootstrap-admin-key.yaml): the CLI in a production environment
    # without any static key, against the database.
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SVD_SERVE_")}
    env.update(SVD_SERVE_ENVIRONMENT="production", SVD_SERVE_URL_SIGNING_SECRET="s3cret-value",
               SVD_SERVE_DATABASE_URL=keyless_database_url, SVD_SERVE_LOG_FORMAT="json")
    created = cli("keys", "create", "--owner", "ops", "--scopes", "admin", "--name", "bootstrap", cwd=tmp_path, env=env)
    assert created.returncode == 0, created.stderr
    admin_key = created.stdout.splitlines()[0].strip()  # the key comes first, alone on its line
    assert key_prefix(admin_key) is not None, created.stdout
    async with running_app(settings) as app, app.client(admin_key) as client:
        listed = await app.services.security.api_keys.list_keys("ops")
        assert [(k.name, k.scopes) for k in listed] == [("bootstrap", frozenset({Scope.ADMIN}))]
        accepted = await submit(client)
        assert accepted.status_code == 202, accepted.text
        status = await client.get(f"/api/v1/animate-image/status/{accepted.json()['jobId']}")
        assert status.status_code == 200


def test_production_refuses_any_placeholder_secret() -> None:
    with pytest.raises(ValidationError, match="S3_SECRET_ACCESS_KEY"):
        Settings(environment="production", url_signing_secret="s3cret-value", api_keys="a:b",  # type: ignore[arg-type]
                 s3_secret_access_key="changeme")


# The CLI -------------------------------------------------------------------------------------


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


async def test_cli_creates_lists_and_revokes_keys(tmp_path: Path) -> None:
    import os

    db = f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVD_SERVE_")}
    env["SVD_SERVE_DATABASE_URL"] = db
    unmigrated = cli("keys", "list", cwd=tmp_path, env=env)
    assert unmigrated.returncode == 1 and "svd-serve migrate" in unmigrated.stderr
    upgrade(db)

    created = cli("keys", "create", "--owner", "acme", "--scopes", "submit,read", "--name", "backend",
                  cwd=tmp_path, env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert created.stdout == key + "\n", "stdout carries the key alone (scripts capture it)"
    assert key_prefix(key) is not None and "not shown again" in created.stderr
    assert "owner=acme" in created.stderr and "scopes=read,submit" in created.stderr

    listed = cli("keys", "list", cwd=tmp_path, env=env)
    assert listed.returncode == 0 and "acme" in listed.stdout and key not in listed.stdout
    assert key.split("_", 2)[2] not in listed.stdout
    as_json = cli("keys", "list", "--json", cwd=tmp_path, env=env)
    assert as_json.returncode == 0, as_json.stderr
    [entry] = json.loads(as_json.stdout)  # stdout is the JSON alone
    assert entry["ownerId"] == "acme" and entry["scopes"] == ["read", "submit"] and entry["active"] is True
    assert entry["name"] == "backend" and key not in as_json.stdout

    engine = make_engine(db)
    try:
        repo = ApiKeyRepository(make_session_factory(engine))
        found = await repo.authenticate(key)
        assert found is not None and found.owner_id == "acme"
        bad_scope = cli("keys", "create", "--owner", "acme", "--scopes", "root", cwd=tmp_path, env=env)
        assert bad_scope.returncode == 1 and "Unknown scope" in bad_scope.stderr

        revoked = cli("keys", "revoke", found.prefix, cwd=tmp_path, env=env)
        assert revoked.returncode == 0 and "revoked" in revoked.stdout
        assert await repo.authenticate(key) is None
    finally:
        await engine.dispose()
    assert "acme" not in cli("keys", "list", cwd=tmp_path, env=env).stdout
    assert "revoked" in cli("keys", "list", "--all", cwd=tmp_path, env=env).stdout
    missing = cli("keys", "revoke", "000000000000", cwd=tmp_path, env=env)
    assert missing.returncode == 1 and "No API key" in missing.stderr


# Secrets ---------------------------------------------------------------------------------------


def test_redactor_scrubs_secrets_from_log_events() -> None:
    from serving.security.redaction import REDACTED, SecretRedactor

    key = "svd_0123456789ab_" + "S" * 43
    redactor = SecretRedactor(["my-url-signing-secret"])
    event = redactor(None, "info", {
        "event": f"request with {key}",
        "authorization": "Bearer abc.def",
        "api_key": "whatever",
        "headers": {"Authorization": "Bearer abc", "X-Other": "fine"},
        "detail": "retry after Bearer tok123 failed",
        "url": "https://bucket.s3.amazonaws.com/o/v.mp4?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=deadbeef&x=1",
        "files": "/files/a/b.mp4?expires=1&signature=cafe",
        "proxy": "https://user:hunter2@proxy.example/",
        "note": "signed with my-url-signing-secret",
        "items": ["Bearer zzz", {"token": "t"}],
        "error": ValueError(f"bad key {key}"),
        "count": 3,
    })
    text = repr(event)
    for secret in (key, "abc.def", "whatever", "tok123", "deadbeef", "AKIA", "cafe", "hunter2",
                   "my-url-signing-secret", "zzz"):
        assert secret not in text, secret
    assert event["authorization"] == REDACTED and event["headers"]["X-Other"] == "fine"
    assert event["url"].startswith("https://bucket.s3.amazonaws.com/o/v.mp4?") and "x=1" in event["url"]
    assert event["count"] == 3


async def test_logs_responses_and_metrics_never_carry_keys(
    database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    from serving.security.redaction import install_redaction

    settings = app_settings(database_url, redis_url, unique_prefix, tmp_path,
                            api_keys=f"ops-{unique_prefix}:static-bootstrap-key-9",
                            url_signing_secret="a-long-url-signing-secret")
    out = io.StringIO()
    structlog.configure(processors=[structlog.processors.JSONRenderer()],
                        logger_factory=structlog.PrintLoggerFactory(file=out))
    try:
        install_redaction(settings)
        async with running_app(settings) as app:
            key = await app.new_key(f"olga-{unique_prefix}")
            forged = "svd_0123456789ab_" + "F" * 43
            async with app.client(key) as client, app.client(forged) as bad, \
                    app.client("static-bootstrap-key-9") as static:
                job_id = (await submit(client)).json()["jobId"]
                assert (await static.get("/api/v1/animate-image")).status_code == 200
                refused = await bad.get(f"/api/v1/animate-image/status/{job_id}")
                assert refused.status_code == 401 and forged not in refused.text
                status = await client.get(f"/api/v1/animate-image/status/{job_id}")
                metrics = (await client.get("/metrics")).text
                # What a careless log line would carry: all of it is scrubbed.
                structlog.get_logger("t").info("debug_dump", headers=dict(client.headers), key=key, static="x",
                                               body=f"presented {forged} and static-bootstrap-key-9",
                                               signing="a-long-url-signing-secret")
        logged = out.getvalue()
        assert "job_accepted" in logged and "debug_dump" in logged
        for secret in (key, forged, "static-bootstrap-key-9", "a-long-url-signing-secret"):
            assert secret not in logged, secret
            assert secret not in metrics and secret not in status.text, secret
    finally:
        structlog.reset_defaults()


def test_local_stack_disables_auth_only_without_keys_or_an_explicit_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from serving.cli import _local_dev_auth

    for name in [n for n in os.environ if n.startswith("SVD_SERVE_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("SVD_SERVE_AUTH_DISABLED", raising=False)  # restored (removed) after the test
    keyed = _local_dev_auth(Settings(api_keys="me:local-key-123"))  # type: ignore[arg-type]
    assert not keyed.auth_disabled
    monkeypatch.setenv("SVD_SERVE_AUTH_DISABLED", "false")
    assert not _local_dev_auth(Settings()).auth_disabled  # the operator said no
    monkeypatch.delenv("SVD_SERVE_AUTH_DISABLED")
    dev = _local_dev_auth(Settings())
    assert dev.auth_disabled  # local_stack passes it to its processes (tests/e2e/test_demo.py runs that)
