"""How long the local pool has been unusable: one of the router's fallback signals.

A pool on its way up is not down: scale from zero and a new spot node (boot, image pull, weights,
compile) take minutes, and a job sent there now runs as soon as the replica is ready. Such a cold
start counts against the pool only once it has taken longer than its own allowance.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)


class PoolState(str, enum.Enum):
    READY = "ready"  # a replica runs
    IDLE = "idle"  # none wanted (scaled to zero on purpose): the next job brings one up
    STARTING = "starting"  # replicas wanted and on their way
    DOWN = "down"  # unhealthy, failed to deploy, or gone


def pool_state_of(deployment_status: str, replica_states: dict[str, int]) -> PoolState:
    """Classify a Serve deployment from its status and replica counts (names as Serve prints
    them, with or without their enum prefix)."""
    status = deployment_status.rsplit(".", 1)[-1]
    counts = {name.rsplit(".", 1)[-1]: n for name, n in replica_states.items()}
    if counts.get("RUNNING", 0) > 0:
        return PoolState.READY
    if status in ("UNHEALTHY", "DEPLOY_FAILED"):
        return PoolState.DOWN
    if status == "HEALTHY" and not any(counts.get(s, 0) for s in ("STARTING", "PENDING_MIGRATION", "UPDATING")):
        return PoolState.IDLE  # nothing wanted: scaled to zero on purpose
    return PoolState.STARTING


HealthProbe = Callable[[], Awaitable[PoolState | bool]]


class LocalHealth:
    """Remembers since when the local pool has been down or starting. `refresh` asks the probe
    (at most every `min_interval_s`); a probe that raises counts as down; a bool answer means
    READY (True) or DOWN (False)."""

    def __init__(
        self,
        probe: HealthProbe,
        *,
        min_interval_s: float = 5.0,
        cold_start_allowance_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._min_interval_s = min_interval_s
        self._cold_start_allowance_s = cold_start_allowance_s
        self._clock = clock
        self._checked_at: float | None = None
        self._state: PoolState | None = None
        self._since: float | None = None  # when the pool entered its current state

    def observe(self, state: PoolState | bool) -> None:
        if isinstance(state, bool):
            state = PoolState.READY if state else PoolState.DOWN
        now = self._clock()
        self._checked_at = now
        if state is not self._state:
            if state in (PoolState.DOWN, PoolState.STARTING):
                log.info("local_pool_state", state=state.value)
            self._state, self._since = state, now

    async def refresh(self) -> None:
        if self._checked_at is not None and self._clock() - self._checked_at < self._min_interval_s:
            return
        try:
            state = await self._probe()
        except Exception as exc:  # a probe that cannot answer is a pool we cannot use
            log.warning("local_health_probe_failed", error=repr(exc))
            state = PoolState.DOWN
        self.observe(state)

    @property
    def state(self) -> PoolState | None:
        return self._state

    def unhealthy_for_s(self) -> float:
        """Seconds the pool has been unusable: down since it went down; starting only for what
        exceeds the cold-start allowance; 0 while ready, idle or never checked."""
        if self._since is None or self._state in (None, PoolState.READY, PoolState.IDLE):
            return 0.0
        elapsed = self._clock() - self._since
        if self._state is PoolState.STARTING:
            return max(0.0, elapsed - self._cold_start_allowance_s)
        return elapsed
