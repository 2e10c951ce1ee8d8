"""Fixtures for the serving tests: a real S3-compatible server (SeaweedFS) on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3_server import S3Endpoint, running_s3_server


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """One SeaweedFS server for the whole session; tests isolate themselves by bucket."""
    with running_s3_server(tmp_path_factory.mktemp("s3")) as endpoint:
        yield endpoint
