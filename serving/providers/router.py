"""Which provider runs a job, and why (issue #6, #14).

Per request `provider`: `local`, `runway`, `fal` (alias `pika`) or `auto` (the default). `auto`
stays local unless the operator allowed the fallback (`fallback_enabled` and a key for the
`fallback_provider`, Runway or fal) and one of these holds: the job failed locally on its every
attempt; the local pool has had no healthy replica for longer than `local_unhealthy_threshold_s`;
the estimated local queue wait exceeds `routing_sla_s`; the local breaker is open. A provider
whose breaker is open gets nothing but its periodic probe. Each decision is stored on the job
(`provider`, `routing_reason`) and counted in metrics by `serving.providers.routed`.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog

from serving.backend import ProviderBackend
from serving.errors import PermanentError, ProviderUnavailable
from serving.providers.breaker import CircuitBreaker
from serving.providers.health import LocalHealth
from serving.provider_names import AUTO, LOCAL, MANAGED, PROVIDERS, RUNWAY, canonical
from serving.settings import Settings

log = structlog.get_logger(__name__)

WaitEstimator = Callable[[], Awaitable[float]]


class RoutingReason(str, enum.Enum):
    REQUESTED = "requested"  # the client named the provider
    DEFAULT = "default"  # auto, and the local pool can serve
    LOCAL_FAILED = "local_failed"  # failed locally on every attempt
    LOCAL_UNHEALTHY = "local_unhealthy"  # no healthy local replica for too long
    QUEUE_WAIT = "queue_wait"  # the estimated local wait exceeds the SLA
    LOCAL_BREAKER_OPEN = "local_breaker_open"
    FALLBACK_BREAKER_OPEN = "fallback_breaker_open"  # would have fallen back, but that provider is failing
    RESUMED = "resumed"  # a provider task already exists for the job: keep polling it


@dataclass(frozen=True)
class RoutingPolicy:
    """The operator's routing settings."""

    configured: frozenset[str]  # managed providers with an API key
    fallback_enabled: bool
    unhealthy_threshold_s: float
    sla_s: float  # 0: no SLA rule
    fallback_provider: str = RUNWAY  # where `auto` goes when a rule fires

    @classmethod
    def from_settings(cls, settings: Settings) -> RoutingPolicy:
        return cls(
            configured=settings.configured_providers(),
            fallback_enabled=settings.fallback_enabled,
            unhealthy_threshold_s=settings.local_unhealthy_threshold_s,
            sla_s=settings.routing_sla_s,
            fallback_provider=settings.fallback_provider,
        )

    @property
    def fallback_allowed(self) -> bool:
        return self.fallback_enabled and self.fallback_provider in self.configured



@dataclass(frozen=True)
class RoutingSignals:
    """What the router knows about the local pool when it decides."""

    local_unhealthy_for_s: float = 0.0
    estimated_wait_s: float = 0.0
    local_failed: bool = False
    open_breakers: frozenset[str] = frozenset()  # providers refusing work (or without an adapter)


@dataclass(frozen=True)
class RoutingDecision:
    provider: str
    reason: RoutingReason


def decide(requested: str, signals: RoutingSignals, policy: RoutingPolicy) -> RoutingDecision:
    """The routing rules, as a pure function. Raises `PermanentError` for a managed provider
    without a key, `ProviderUnavailable` (retryable) for one whose breaker is open."""
    requested = canonical(requested)
    if requested == LOCAL:
        return RoutingDecision(LOCAL, RoutingReason.REQUESTED)
    if requested in MANAGED:
        if requested not in policy.configured:
            raise PermanentError(
                f"Provider {requested!r} was requested but no API key for it is configured.",
                code="provider_not_configured",
            )
        if requested in signals.open_breakers:
            raise ProviderUnavailable(
                f"Provider {requested!r} keeps failing; its circuit breaker is open. The job will be retried."
            )
        return RoutingDecision(requested, RoutingReason.REQUESTED)
    if requested != AUTO:
        raise PermanentError(f"Unknown provider {requested!r}.", code="unknown_provider")
    if not policy.fallback_allowed:
        return RoutingDecision(LOCAL, RoutingReason.DEFAULT)
    reason: RoutingReason | None = None
    if signals.local_failed:
        reason = RoutingReason.LOCAL_FAILED
    elif signals.local_unhealthy_for_s > policy.unhealthy_threshold_s:
        reason = RoutingReason.LOCAL_UNHEALTHY
    elif policy.sla_s > 0 and signals.estimated_wait_s > policy.sla_s:
        reason = RoutingReason.QUEUE_WAIT
    elif LOCAL in signals.open_breakers:
        reason = RoutingReason.LOCAL_BREAKER_OPEN
    if reason is None:
        return RoutingDecision(LOCAL, RoutingReason.DEFAULT)
    if policy.fallback_provider in signals.open_breakers:
        return RoutingDecision(LOCAL, RoutingReason.FALLBACK_BREAKER_OPEN)
    return RoutingDecision(policy.fallback_provider, reason)


class ProviderRouter:
    """Holds the backends and their breakers; gathers the signals and decides per job."""

    def __init__(
        self,
        policy: RoutingPolicy,
        backends: Mapping[str, ProviderBackend],
        breakers: Mapping[str, CircuitBreaker],
        *,
        health: LocalHealth | None = None,
        estimate_wait_s: WaitEstimator | None = None,
    ) -> None:
        if LOCAL not in backends:
            raise ValueError("the local backend is required")
        self.policy = policy
        self._backends = dict(backends)
        self._breakers = dict(breakers)
        self._health = health
        self._estimate_wait_s = estimate_wait_s

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        backends: Mapping[str, ProviderBackend],
        *,
        health: LocalHealth | None = None,
        estimate_wait_s: WaitEstimator | None = None,
    ) -> ProviderRouter:
        breakers = {
            name: CircuitBreaker(
                name, failure_threshold=settings.breaker_failure_threshold, reset_s=settings.breaker_reset_s
            )
            for name in backends
        }
        return cls(
            RoutingPolicy.from_settings(settings), backends, breakers, health=health, estimate_wait_s=estimate_wait_s
        )

    def backend(self, provider: str) -> ProviderBackend:
        try:
            return self._backends[provider]
        except KeyError:
            raise PermanentError(f"Provider {provider!r} is not configured.", code="provider_not_configured") from None

    def breaker(self, provider: str) -> CircuitBreaker | None:
        return self._breakers.get(provider)

    def _open(self, provider: str) -> bool:
        breaker = self._breakers.get(provider)
        if provider not in self._backends:
            return True  # no adapter: as unusable as a failing one
        return breaker is not None and not breaker.available()

    def _open_breakers(self) -> frozenset[str]:
        return frozenset(p for p in PROVIDERS if self._open(p))

    async def signals(self, *, local_failed: bool = False) -> RoutingSignals:
        unhealthy_s = 0.0
        if not self.policy.fallback_allowed:
            # Nowhere to fall back to: the local pool's health and queue cannot change the decision.
            return RoutingSignals(local_failed=local_failed, open_breakers=self._open_breakers())
        if self._health is not None:
            await self._health.refresh()
            unhealthy_s = self._health.unhealthy_for_s()
        wait_s = 0.0
        if self._estimate_wait_s is not None and self.policy.sla_s > 0:
            try:
                wait_s = await self._estimate_wait_s()
            except Exception as exc:  # no estimate: the SLA rule cannot fire, the others still can
                log.warning("queue_wait_estimate_failed", error=repr(exc))
        return RoutingSignals(
            local_unhealthy_for_s=unhealthy_s,
            estimated_wait_s=wait_s,
            local_failed=local_failed,
            open_breakers=self._open_breakers(),
        )

    async def route(self, requested: str, *, local_failed: bool = False) -> RoutingDecision:
        """Decide for one job, claim the chosen provider's breaker slot, count the decision."""
        decision = decide(requested, await self.signals(local_failed=local_failed), self.policy)
        breaker = self._breakers.get(decision.provider)
        if breaker is not None:
            breaker.allow()  # takes the half-open probe when that is what let the job through
        return decision

    def breakers_open(self) -> dict[str, bool]:
        """Each provider's breaker: open (refusing work) or not, for the breaker gauge."""
        return {name: not breaker.available() for name, breaker in self._breakers.items()}

    def record(self, provider: str, *, ok: bool) -> None:
        """The outcome of one call to `provider`, for its breaker."""
        breaker = self._breakers.get(provider)
        if breaker is None:
            return
        if ok:
            breaker.record_success()
        else:
            breaker.record_failure()
