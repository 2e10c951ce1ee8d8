"""A multi-node Ray cluster on one machine for the scale-out tests, plus the fault suite's stack
(ingress process, real Redis and PostgreSQL, webhook receiver)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.ray_cluster import RayCluster, make_cluster
from tests.faults.conftest import faults_database_url, receiver, stack  # noqa: F401  (fixtures)

GPU_WORKERS = 3


@pytest.fixture
def ray_cluster() -> Iterator[RayCluster]:
    """Head (Serve controller, Dispatcher) plus three worker nodes with one logical GPU each."""
    cluster = make_cluster()
    try:
        cluster.start_head()
        for _ in range(GPU_WORKERS):
            cluster.add_gpu_worker()
        yield cluster
    finally:
        cluster.stop()
