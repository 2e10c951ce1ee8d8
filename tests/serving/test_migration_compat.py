"""Expand/contract migrations across a release: this code plays the old release, a copy of its
migrations with two more steps plays the next one (0008 expands, 0009 contracts)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest
from alembic import command
from alembic.config import Config

from serving.db.compat import MIGRATION_LOCK_KEY, oldest_compatible, recorded_oldest
from serving.db.engine import make_engine
from serving.db.errors import DatabaseNotMigrated
from serving.db.migrate import MIGRATIONS_DIR, check_migrated, current_revision, head_revision, upgrade
from serving.local_stack import free_port
from tests.conftest import REDIS_URL
from tests.serving.db_fixtures import BACKENDS, fresh_pg_database, sqlite_url

SAMPLE = Path(__file__).resolve().parents[2] / "serving" / "assets" / "sample.png"

EXPAND = '''
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
oldest_compatible_revision = None  # a nullable column: older code never sees it


def upgrade():
    op.add_column("jobs", sa.Column("next_release_note", sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("next_release_note")
'''
CONTRACT = '''
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
oldest_compatible_revision = "0009"  # drops a column every older release writes


def upgrade():
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("routing_reason")


def downgrade():
    op.add_column("jobs", sa.Column("routing_reason", sa.String(64), nullable=True))
'''


class NextRelease:
    """The migrations of a release after this code's: ours plus 0008 and 0009."""

    def __init__(self, directory: Path) -> None:
        shutil.copytree(MIGRATIONS_DIR, directory, ignore=shutil.ignore_patterns("__pycache__"))
        (directory / "versions" / "0008_expand.py").write_text(EXPAND)
        (directory / "versions" / "0009_contract.py").write_text(CONTRACT)
        self.directory = directory

    def migrate(self, database_url: str, revision: str) -> None:
        self._run(command.upgrade, database_url, revision)

    def roll_back(self, database_url: str, revision: str) -> None:
        self._run(command.downgrade, database_url, revision)

    def _run(self, alembic_command: Callable[[Config, str], None], database_url: str, revision: str) -> None:
        config = Config()
        config.set_main_option("script_location", str(self.directory))
        config.attributes["database_url"] = database_url
        # env.py runs its own event loop: keep it off the test's (as serving.db.migrate does).
        with ThreadPoolExecutor(1) as pool:
            pool.submit(alembic_command, config, revision).result()


@pytest.fixture
def next_release(tmp_path: Path) -> NextRelease:
    return NextRelease(tmp_path / "next-migrations")


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "jobs.db")
    else:
        with fresh_pg_database() as url:
            yield url


async def _recorded(url: str) -> str | None:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(recorded_oldest)
    finally:
        await engine.dispose()


async def test_this_code_accepts_a_compatible_newer_schema_and_refuses_a_contracted_one(
    db_url: str, next_release: NextRelease
) -> None:
    upgrade(db_url)
    assert head_revision() == "0007"
    assert await _recorded(db_url) == "0006"  # 0001-0006 are strict, 0007 only expands

    next_release.migrate(db_url, "0008")
    assert current_revision(db_url) == "0008"
    assert await _recorded(db_url) == "0006"
    await check_migrated(db_url)  # an old pod keeps passing its readiness check
    upgrade(db_url)  # and its migrate step (an init container) leaves the newer schema alone
    assert current_revision(db_url) == "0008"

    next_release.migrate(db_url, "0009")
    assert await _recorded(db_url) == "0009"
    message = (
        "The database is at revision 0009, which a newer release applied and which needs code at "
        "revision 0009 or later; this code is at revision 0007: deploy the newer release."
    )
    with pytest.raises(DatabaseNotMigrated) as refused:
        await check_migrated(db_url)
    assert refused.value.message == message
    with pytest.raises(DatabaseNotMigrated):
        upgrade(db_url)
    assert current_revision(db_url) == "0009"

    next_release.roll_back(db_url, "0008")  # the next release is rolled back: old code fits again
    assert await _recorded(db_url) == "0006"
    await check_migrated(db_url)


def test_the_newest_declared_constraint_wins(next_release: NextRelease) -> None:
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(next_release.directory))
    script = ScriptDirectory.from_config(config)
    assert [oldest_compatible(script, rev) for rev in ("0001", "0006", "0007", "0008", "0009")] == [
        "0001", "0006", "0006", "0006", "0009",
    ]


def test_pods_migrating_at_once_take_turns(tmp_path: Path) -> None:
    """Several api pods' init containers run `svd-serve migrate` on one empty database: each
    waits for the migration lock, then all succeed one after the other."""
    with fresh_pg_database() as url, psycopg.connect(url.replace("+asyncpg", ""), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))  # a migration in progress
        env = {**os.environ, "SVD_SERVE_DATABASE_URL": url, "SVD_SERVE_DATA_DIR": str(tmp_path)}
        procs = [
            subprocess.Popen([sys.executable, "-m", "serving.cli", "migrate"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        try:
            def waiting() -> int:
                row = holder.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ).fetchone()
                return int(row[0]) if row else 0

            _wait(lambda: waiting() == 3, lambda: any(p.poll() is not None for p in procs), tmp_path / "none.log")
            assert current_revision(url) is None
            holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
            outcomes = [(proc.wait(timeout=120), proc.communicate()[1]) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        assert [code for code, _ in outcomes] == [0, 0, 0], [err[-2000:] for _, err in outcomes]
        assert current_revision(url) == head_revision()


# The old release as a running process ------------------------------------------------------------


class Ingress:
    """`svd-serve api` of this (the old) release as its own process."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{port}"

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "api"], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)
        return self.proc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": "Bearer old-release-key"}, timeout=30)

    def wait_ready(self) -> None:
        def ready() -> bool:
            try:
                return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, lambda: self.proc is not None and self.proc.poll() is not None, self.log)


def _wait(done: Callable[[], bool], failed: Callable[[], bool], log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return
        if failed():
            raise AssertionError(f"a process exited early:\n{_tail(log)}")
        time.sleep(0.2)
    raise AssertionError(f"not done after {timeout_s} s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def _submit_and_read(client: httpx.Client) -> None:
    with SAMPLE.open("rb") as fh:
        response = client.post("/api/v1/animate-image", files={"image": ("sample.png", fh, "image/png")},
                               data={"numFrames": "4", "width": "64", "height": "64"})
    assert response.status_code == 202, response.text
    status = client.get(f"/api/v1/animate-image/status/{response.json()['jobId']}")
    assert status.status_code == 200, status.text
    assert status.json()["status"] == "queued"


@pytest.mark.slow
@pytest.mark.e2e
def test_old_release_keeps_serving_after_the_next_release_migrates(
    next_release: NextRelease, tmp_path: Path, unique_prefix: str
) -> None:
    with fresh_pg_database() as url:
        port = free_port()
        env = {
            **os.environ,
            "SVD_SERVE_DATA_DIR": str(tmp_path / "data"),
            "SVD_SERVE_DATABASE_URL": url,
            "REDIS_URL": REDIS_URL,
            "SVD_SERVE_QUEUE_NAME": unique_prefix,
            "SVD_SERVE_KEY_PREFIX": unique_prefix,
            "SVD_SERVE_API_KEYS": "old:old-release-key",
            "SVD_SERVE_PORT": str(port),
        }
        migrate = [sys.executable, "-m", "serving.cli", "migrate"]
        subprocess.run(migrate, env=env, check=True, capture_output=True)
        ingress = Ingress(env, port, tmp_path / "api.log")
        ingress.start()
        try:
            ingress.wait_ready()
            with ingress.client() as client:
                _submit_and_read(client)

                next_release.migrate(url, "0008")  # the new release's migration step runs
                assert client.get("/readyz").status_code == 200
                _submit_and_read(client)  # the running old pod writes rows into the wider table

                ingress.stop()  # a spot node goes away; the old pod restarts
                rerun = subprocess.run(migrate, env=env, capture_output=True, text=True)
                assert rerun.returncode == 0, rerun.stderr  # its init container passes
                assert current_revision(url) == "0008"
                check = subprocess.run([*migrate, "--check"], env=env, capture_output=True, text=True)
                assert check.returncode == 0, check.stderr  # the Ray head's init container passes
                ingress.start()
                ingress.wait_ready()
                _submit_and_read(client)

                next_release.migrate(url, "0009")  # contract: old code no longer fits
                refused = client.get("/readyz")
                assert refused.status_code == 503
                assert refused.json()["checks"]["database"] == "error: database_not_migrated"
            check = subprocess.run([*migrate, "--check"], env=env, capture_output=True, text=True)
            assert check.returncode == 3
            assert check.stderr.startswith("error: The database is at revision 0009, which a newer release")
            ingress.stop()
            proc = ingress.start()
            assert proc.wait(timeout=90) != 0
            assert "needs code at revision 0009 or later" in ingress.log.read_text(errors="replace")
        finally:
            ingress.stop()
