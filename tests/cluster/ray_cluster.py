"""A real multi-node Ray cluster on one machine: `ray start --head` plus worker nodes that each
declare one logical GPU, every node a `ray start --block` process of its own.

Ports and the session directory are private to the cluster (several test runs, and other
people's Ray clusters, may share the machine), and the teardown kills only the processes of this
cluster: the `ray start` groups, then any process whose command line names its session dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from serving.local_stack import free_port
from serving.worker.node_drain import GcsNodes

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 180.0
# Plasma stores are sized to what tiny-model frames need, not to a fraction of the machine.
OBJECT_STORE_BYTES = 150 * 1024 * 1024


@dataclass
class RayNode:
    proc: subprocess.Popen[bytes]
    log: Path
    node_id: str = ""

    def kill(self) -> None:
        """The node is gone at once, as when its spot VM is reclaimed (SIGKILL of its group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@dataclass
class RayCluster:
    """`head` holds the Serve controller and the Dispatcher (custom resource `svd-dispatcher`,
    as the Kubernetes head does); `workers` each hold one logical GPU."""

    temp_dir: Path
    port: int
    metrics_port: int
    head: RayNode | None = None
    workers: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def gcs(self) -> GcsNodes:
        return GcsNodes(self.address)

    def _start(self, args: list[str], name: str, extra_env: dict[str, str] | None = None) -> RayNode:
        log = self.temp_dir.parent / f"{self.temp_dir.name}-{name}.log"
        # The test drains nodes itself; on teardown `ray start` need not drain its node for 30 s.
        # Token authentication off, said explicitly: `ray start --head` turns it on by itself when
        # any earlier local `ray.init()` left a token in ~/.ray, and the test's clients (and
        # `svd-serve worker` joining by address) would then be refused.
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
               "RAY_AUTH_MODE": "disabled", **(extra_env or {})}
        env.pop("RAY_ADDRESS", None)
        with log.open("wb") as out:
            proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return RayNode(proc, log)

    def _wait_nodes(self, count: int) -> dict[str, str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                nodes = self.gcs().alive_nodes()
                if len(nodes) >= count:
                    return nodes
            except Exception:  # the GCS is still starting
                nodes = {}
            for node in [self.head, *self.workers]:
                if node is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"ray node exited {node.proc.returncode}:\n{node.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} of {count} Ray nodes up within {START_TIMEOUT_S} s")
            time.sleep(0.2)  # polling the GCS, bounded by the deadline

    def start_head(self, gpu_nodes_on_demand: int = 0) -> None:
        """With `gpu_nodes_on_demand`, Ray's autoscaler runs on the head with its fake multi-node
        provider (nodes are local processes) and adds up to that many one-GPU worker nodes when
        resource demand (a Generator replica that does not fit) asks for them."""
        args = ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", "--num-cpus=1", "--num-gpus=0",
                '--resources={"svd-dispatcher": 1}', "--include-dashboard=false",
                f"--metrics-export-port={self.metrics_port}", f"--object-store-memory={OBJECT_STORE_BYTES}"]
        env: dict[str, str] = {}
        if gpu_nodes_on_demand:
            config = self.temp_dir.parent / f"{self.temp_dir.name}-autoscaler.json"
            config.write_text(json.dumps(fake_autoscaler_config(self.port, gpu_nodes_on_demand)))
            args.append(f"--autoscaling-config={config}")
            env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                   "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
        self.head = self._start(args, "head", env)
        (self.head.node_id,) = self._wait_nodes(1)

    def add_gpu_worker(self) -> RayNode:
        before = set(self.gcs().alive_nodes())
        node = self._start(
            [f"--address={self.address}", "--num-cpus=1", "--num-gpus=1",
             f"--object-store-memory={OBJECT_STORE_BYTES}"],
            f"worker{len(self.workers)}",
        )
        self.workers.append(node)
        nodes = self._wait_nodes(len(before) + 1)
        (node.node_id,) = set(nodes) - before
        return node

    def worker(self, node_id: str) -> RayNode:
        return next(w for w in self.workers if w.node_id == node_id)

    def stop(self) -> None:
        for node in [*self.workers, self.head]:
            if node is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node
        for node in [*self.workers, self.head]:
            if node is None:
                continue
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
        # Ray's agents outlive their raylet in the node's session; workers and replicas run in
        # sessions of their own but name the session dir (or die with their raylet).
        sessions = {str(node.proc.pid) for node in [*self.workers, self.head] if node is not None}
        listing = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            pid, sid, args = (line.split(None, 2) + ["", ""])[:3]
            if sid in sessions or str(self.temp_dir) in args:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        if os.environ.get("SVD_TEST_KEEP_RAY_LOGS") != "1":  # set it to read the logs after a failure
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            for beside in self.temp_dir.parent.glob(f"{self.temp_dir.name}-*"):  # node logs, autoscaler config
                beside.unlink(missing_ok=True)


FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # what Ray's fake multi-node provider calls the head


def fake_autoscaler_config(port: int, max_gpu_nodes: int) -> dict[str, object]:
    """An autoscaler config for Ray's fake multi-node provider: a `gpu` node type of one CPU and
    one logical GPU, none at first; idle ones are removed after 15 s."""
    from ray._private.services import get_node_ip_address

    return {
        "cluster_name": "svd-fake", "max_workers": max_gpu_nodes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"{get_node_ip_address()}:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1, "svd-dispatcher": 1}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": OBJECT_STORE_BYTES},
                    "node_config": {}, "min_workers": 0, "max_workers": max_gpu_nodes},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.25,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def make_cluster() -> RayCluster:
    # Unix socket paths live under the session dir and must stay short (108 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="svdray-", dir="/tmp"))
    return RayCluster(temp_dir=temp_dir, port=free_port(), metrics_port=free_port())
