"""Fixtures for the serving tests: a migrated job store on each database, and a real
S3-compatible server (SeaweedFS) on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.db.migrate import upgrade
from tests.s3_server import S3Endpoint, running_s3_server


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """One SeaweedFS server for the whole session; tests isolate themselves by bucket."""
    with running_s3_server(tmp_path_factory.mktemp("s3")) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def migrated_pg(pg_database_url: str) -> str:
    """The session's PostgreSQL database, migrated to head once."""
    upgrade(pg_database_url)
    return pg_database_url


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated job store: the session's PostgreSQL database, or a fresh SQLite file."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("pg_database_url")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    return url
