"""One error hierarchy; `serving.ingress.problems` maps it to HTTP in one place."""

from __future__ import annotations


class SvdServeError(Exception):
    """Base of every error we raise on purpose. `code` is stable and part of the API."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidInput(SvdServeError):
    """The client sent something we will not run (4xx, nothing stored)."""

    code = "invalid_input"
    status = 422


class NotFound(SvdServeError):
    code = "not_found"
    status = 404


class Unauthorized(SvdServeError):
    code = "unauthorized"
    status = 401


class Conflict(SvdServeError):
    code = "conflict"
    status = 409


class CapacityError(SvdServeError):
    """No capacity right now (queue full, service saturated); the client may retry later."""

    code = "capacity"
    status = 503


class RetryableError(SvdServeError):
    """A job failed in a way that another attempt may fix (worker lost, transient I/O)."""

    code = "retryable"
    status = 503


class RunHandedBack(RetryableError):
    """A Generator gave a run back because its Ray node is draining (spot preemption, scale-down
    of nodes): the dispatcher runs the job again on another replica, without spending an attempt."""

    code = "run_handed_back"


class PermanentError(SvdServeError):
    """A job failed in a way that retrying will not fix. `gpu_seconds`: the GPU time the failed
    run still spent (a NaN video took its full denoising loop), charged to the job's owner."""

    code = "generation_failed"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, gpu_seconds: float | None = None) -> None:
        super().__init__(message, code=code)
        self.gpu_seconds = gpu_seconds


class JobCanceled(SvdServeError):
    """Raised inside a running job when its cancel flag is seen."""

    code = "canceled"
    status = 409


class InvalidTransition(SvdServeError):
    """A job state change that the state machine refuses."""

    code = "invalid_transition"
    status = 409


class Forbidden(SvdServeError):
    """A valid API key without the scope this request needs."""

    code = "insufficient_scope"
    status = 403


class PayloadTooLarge(SvdServeError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(SvdServeError):
    code = "unsupported_media_type"
    status = 415


class RateLimited(SvdServeError):
    """A rate limit or quota is exhausted; `retry_after_s` says when trying again can succeed."""

    code = "rate_limited"
    status = 429

    def __init__(
        self, message: str, *, retry_after_s: int, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = max(1, int(retry_after_s))
        self.headers = dict(headers or {})


class QueueFull(RateLimited):
    """The queue of this priority is at its bound (backpressure); Retry-After from the drain rate."""

    code = "queue_full"
    status = 429


class ServiceSaturated(RateLimited):
    """The whole queue is at its bound: the service itself is saturated (503 with Retry-After)."""

    code = "service_saturated"
    status = 503


class UnsafeUrl(InvalidInput):
    """A URL we will not connect to: wrong scheme, or it leads to a private/internal address."""

    code = "unsafe_url"


class InvalidUrl(UnsafeUrl):
    """A URL that is not well formed: unparseable, without a host, or with a host name that no
    resolver accepts (an empty label, a label over 63 characters, broken IDNA) or a bad port."""

    code = "invalid_url"


class FetchFailed(InvalidInput):
    """A public URL could not be fetched (HTTP error, timeout, too many redirects)."""

    code = "fetch_failed"


class BudgetExceeded(SvdServeError):
    """The owner's monthly budget would be exceeded: new jobs are refused until it resets."""

    code = "budget_exceeded"
    status = 402


class ProviderUnavailable(RetryableError):
    """No provider may take the job now (local pool down and fallback off, or breakers open)."""

    code = "provider_unavailable"


class ProviderTaskFailed(PermanentError):
    """A managed provider's task ended FAILED; `credits` is what the provider still charged."""

    code = "provider_failed"

    def __init__(self, message: str, *, code: str | None = None, credits: float | None = None) -> None:
        super().__init__(message, code=code)
        self.credits = credits
