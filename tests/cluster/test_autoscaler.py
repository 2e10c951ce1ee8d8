"""Serve's demand adds a node: Ray's autoscaler with its fake multi-node provider (nodes are local
processes, each with one logical GPU) on a head that has no GPU. The real app, deployed by
`svd-serve worker`, wants a Generator with `num_gpus=1`; nothing can host it until the autoscaler
sees the pending demand and starts a GPU node, then a job runs there. On Kubernetes the same
demand makes KubeRay add a GPU worker pod (and Karpenter a spot node)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.ray_cluster import FAKE_HEAD_NODE_ID, RayCluster, make_cluster
from tests.cluster.stack import ServeTimeline, assert_completed_once, start_cluster_worker, submit
from tests.faults.conftest import FaultStack

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(900)]

QUICK_JOB = {"numFrames": "4", "numInferenceSteps": "4", "width": "64", "height": "64"}


@pytest.fixture
def autoscaling_cluster() -> Iterator[RayCluster]:
    cluster = make_cluster()
    try:
        cluster.start_head(gpu_nodes_on_demand=2)
        yield cluster
    finally:
        cluster.stop()


async def test_a_generator_that_does_not_fit_brings_up_a_gpu_node(
    stack: FaultStack, autoscaling_cluster: RayCluster, tmp_path: Path
) -> None:
    gcs = autoscaling_cluster.gcs()
    before = gcs.alive_nodes()
    assert list(before) == [FAKE_HEAD_NODE_ID]  # the head alone: no GPU anywhere
    data_dir = tmp_path / "data"
    settings = {"serve_app_name": f"grow-{stack.prefix}", "generator_num_gpus": 1,
                "dispatcher_resources": '{"svd-dispatcher": 0.01}', "autoscale_min_replicas": 1,
                "autoscale_max_replicas": 2, "autoscale_metrics_interval_s": 1, "log_level": "INFO"}
    ingress = stack.start_ingress(data_dir, **settings)
    timeline = ServeTimeline(autoscaling_cluster, settings["serve_app_name"])
    try:
        # `svd-serve worker` returns "ready" only once the app runs, which needs the Generator,
        # which needs a GPU node that only the autoscaler can bring.
        start_cluster_worker(stack, autoscaling_cluster, data_dir, **settings)
        added = set(gcs.alive_nodes()) - set(before)
        assert added, "the app is running without a new node"
        assert any(node != FAKE_HEAD_NODE_ID for node in added)
        await timeline.wait_for("running on it", lambda c: c == (1, 1), 120)
        async with ingress.client() as client:
            job = await submit(client, stack.receiver.url, QUICK_JOB)
        await assert_completed_once(stack, data_dir, [job])
    finally:
        timeline.close()
