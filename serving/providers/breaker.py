"""A circuit breaker per provider: stop sending work to one that keeps failing, probe it later."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(str, enum.Enum):
    CLOSED = "closed"  # work flows
    OPEN = "open"  # refused until `reset_s` passed
    HALF_OPEN = "half_open"  # one probe is out; its outcome closes or re-opens the breaker


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures; after `reset_s` lets a single probe
    through (half-open); a probe that succeeds closes it, one that fails opens it again.

    State lives in the dispatcher replica: each replica learns a provider's health from its own
    calls, which is what a breaker is for (no shared state to lose or contend on)."""

    def __init__(
        self,
        provider: str,
        *,
        failure_threshold: int,
        reset_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1 but is {failure_threshold}")
        self.provider = provider
        self._threshold = failure_threshold
        self._reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probing or self._clock() - self._opened_at >= self._reset_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def available(self) -> bool:
        """Whether a call could go through now, without claiming the half-open probe."""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._probing)

    def allow(self) -> bool:
        """Claim the right to call the provider: always when closed, once when half-open."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self._threshold:
            self._opened_at = self._clock()
            self._probing = False
