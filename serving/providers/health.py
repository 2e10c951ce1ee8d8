"""How long the local pool has had no healthy replica: one of the router's fallback signals."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

HealthProbe = Callable[[], Awaitable[bool]]


class LocalHealth:
    """Remembers since when the local pool has been unhealthy. `refresh` asks the probe (at most
    every `min_interval_s`); a probe that raises counts as unhealthy."""

    def __init__(
        self, probe: HealthProbe, *, min_interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._probe = probe
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._checked_at: float | None = None
        self._unhealthy_since: float | None = None

    def observe(self, healthy: bool) -> None:
        now = self._clock()
        self._checked_at = now
        if healthy:
            self._unhealthy_since = None
        elif self._unhealthy_since is None:
            self._unhealthy_since = now

    async def refresh(self) -> None:
        if self._checked_at is not None and self._clock() - self._checked_at < self._min_interval_s:
            return
        try:
            healthy = await self._probe()
        except Exception as exc:  # a probe that cannot answer is a pool we cannot use
            log.warning("local_health_probe_failed", error=repr(exc))
            healthy = False
        self.observe(healthy)

    def unhealthy_for_s(self) -> float:
        """Seconds since the pool was last seen healthy (0 while healthy or never checked)."""
        if self._unhealthy_since is None:
            return 0.0
        return self._clock() - self._unhealthy_since
