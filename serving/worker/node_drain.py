"""Ray node draining: started by a GPU pod's preStop, seen from inside the replicas on that node.

A spot GPU node is about to go (Karpenter or the AWS Node Termination Handler acting on the
two-minute notice, GKE's graceful node shutdown, a scale-down, `kubectl drain`): Kubernetes
deletes the pod, whose preStop runs `svd-serve drain-node`. That asks Ray's GCS to drain this
pod's Ray node with reason PREEMPTION and a deadline (the pod's grace period, less a margin), the
call autoscaler v2 makes itself. Ray then schedules nothing new there and Ray Serve starts
replacements of the node's replicas elsewhere. Our replicas read the same drain state
(`NodeDrainWatch`): the Generator stops taking runs and hands back those that cannot finish
before the deadline (the Dispatcher runs them again on another node, no attempt spent); a
Dispatcher on that node drains its queue consumer. The preStop then waits until no Serve replica
is left on the node, or the deadline, before the kubelet stops `ray start`.

This is the one module that talks to Ray's GCS client directly (`ray._raylet.GcsClient`, the
client `ray drain-node` and Serve's controller use); nothing else imports Ray internals for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# A replica polls the GCS this often for its node's drain state: one small RPC.
DRAIN_POLL_S = 1.0
# Actor class names of Ray Serve replicas (`ServeReplica:<app>:<deployment>`).
SERVE_REPLICA_CLASS_PREFIX = "ServeReplica:"


@dataclass(frozen=True)
class DrainState:
    """A node being drained, and by when it will be gone (epoch seconds; None: no deadline)."""

    deadline: float | None

    def seconds_left(self, now: float | None = None) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - (time.time() if now is None else now)


def _gcs(address: str) -> Any:
    from ray._raylet import GcsClient

    return GcsClient(address=address)


class GcsNodes:
    """Node facts from Ray's GCS at `address` (`host:port`), without joining the cluster."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client = _gcs(address)

    def drain_state(self, node_id: str) -> DrainState | None:
        """Whether `node_id` (hex) is draining; None when it is not."""
        draining: dict[str, int] = self._client.get_draining_nodes()
        if node_id not in draining:
            return None
        deadline_ms = draining[node_id]
        return DrainState(deadline_ms / 1000.0 if deadline_ms else None)

    def alive_nodes(self) -> dict[str, str]:
        """{node id (hex): node IP} of the live nodes."""
        from ray.core.generated import gcs_pb2

        alive = gcs_pb2.GcsNodeInfo.ALIVE
        return {
            node_id.hex(): info.node_manager_address
            for node_id, info in self._client.get_all_node_info().items()
            if info.state == alive
        }

    def node_with_ip(self, ip: str) -> str:
        """The one live node at `ip` (a Kubernetes pod is one Ray node with the pod's IP)."""
        matches = [node for node, node_ip in self.alive_nodes().items() if node_ip == ip]
        if len(matches) != 1:
            raise LookupError(f"{len(matches)} live Ray nodes have IP {ip}; name the node with --node-id")
        return matches[0]

    def drain(self, node_id: str, *, deadline_s: float | None, message: str) -> None:
        """Ask the GCS to drain `node_id` as for a preemption (always accepted for that reason)."""
        from ray.core.generated import autoscaler_pb2

        deadline_ms = int((time.time() + deadline_s) * 1000) if deadline_s is not None else 0
        accepted, why = self._client.drain_node(
            node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), message, deadline_ms
        )
        if not accepted:
            raise RuntimeError(f"Ray refused to drain node {node_id}: {why}")

    async def serve_replicas_on(self, node_id: str) -> list[str]:
        """Names of the live Ray Serve replica actors on `node_id`."""
        from ray.core.generated import gcs_pb2

        actors = await self._client.async_get_all_actor_info(actor_state_name="ALIVE")
        return [
            actor.class_name
            for actor in actors.values()
            if actor.state == gcs_pb2.ActorTableData.ALIVE
            and actor.node_id.hex() == node_id
            and actor.class_name.startswith(SERVE_REPLICA_CLASS_PREFIX)
        ]


OnDrain = Callable[[DrainState], Awaitable[None]]


class NodeDrainWatch:
    """Inside a replica: polls whether the replica's own node is draining and tells `on_drain`
    on every poll while it is (the time left shrinks, so decisions can change)."""

    def __init__(self, nodes: GcsNodes, node_id: str, on_drain: OnDrain, poll_s: float = DRAIN_POLL_S) -> None:
        self._nodes = nodes
        self._node_id = node_id
        self._on_drain = on_drain
        self._poll_s = poll_s
        self._task: asyncio.Task[None] | None = None
        self.state: DrainState | None = None

    @classmethod
    def for_this_replica(cls, on_drain: OnDrain, poll_s: float = DRAIN_POLL_S) -> NodeDrainWatch:
        import ray

        context = ray.get_runtime_context()
        return cls(GcsNodes(context.gcs_address), context.get_node_id(), on_drain, poll_s)

    @property
    def node_id(self) -> str:
        return self._node_id

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="node-drain-watch")

    async def _run(self) -> None:
        while True:
            try:
                state = await asyncio.to_thread(self._nodes.drain_state, self._node_id)
            except Exception as exc:  # the GCS restarting: keep watching
                log.warning("node_drain_check_failed", error=repr(exc))
                state = None
            if state is not None:
                if self.state is None:
                    log.warning("node_draining", node_id=self._node_id, seconds_left=state.seconds_left())
                self.state = state
                try:
                    await self._on_drain(state)
                except Exception as exc:
                    log.error("node_drain_handler_failed", error=repr(exc))
            await asyncio.sleep(self._poll_s)  # the polling period, not a synchronisation

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])


def local_node_id(nodes: GcsNodes) -> str:
    """This host's Ray node: the live node with this host's IP (a pod is one node, with its own IP)."""
    from ray.util import get_node_ip_address

    return nodes.node_with_ip(get_node_ip_address())


async def drain_this_node(
    nodes: GcsNodes, node_id: str, *, deadline_s: float, message: str, wait: bool, poll_s: float = 1.0
) -> list[str]:
    """What the preStop does: drain `node_id`, then (with `wait`) wait until no Serve replica is
    left on it or the deadline passed. Returns the replicas still there at the end."""
    nodes.drain(node_id, deadline_s=deadline_s, message=message)
    log.warning("node_drain_requested", node_id=node_id, deadline_s=deadline_s, reason=message)
    give_up = time.monotonic() + deadline_s
    left = await nodes.serve_replicas_on(node_id)
    while wait and left and time.monotonic() < give_up:
        await asyncio.sleep(poll_s)  # polling the GCS, bounded by the deadline
        left = await nodes.serve_replicas_on(node_id)
    return left
