"""Typed errors: one class per kind of refusal, each carrying the problem+json `code`.

The service answers every error as RFC 9457 problem details with a stable `code`
(`unknown_model`, `rate_limited`, ...); `APIStatusError.from_response` maps the HTTP status to a
class here and keeps the code, the detail, the request id and `Retry-After`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from svd_serve_client._types import JobInfo


class SvdServeError(Exception):
    """Base of every error this client raises."""


class APIConnectionError(SvdServeError):
    """The service could not be reached (refused, DNS, TLS, dropped connection)."""


class APITimeoutError(APIConnectionError):
    """The service did not answer within the timeout."""


class APIStatusError(SvdServeError):
    """The service answered with an error status; `code` is the problem's stable code."""

    def __init__(self, response: httpx.Response, problem: dict[str, Any]) -> None:
        self.response = response
        self.status_code = response.status_code
        self.problem = problem
        self.code: str = str(problem.get("code") or f"http_{response.status_code}")
        self.detail: str = str(problem.get("detail") or response.reason_phrase or "")
        self.request_id: str | None = response.headers.get("x-request-id")
        self.retry_after: float | None = _retry_after(response, problem)
        super().__init__(f"{self.status_code} {self.code}: {self.detail}")

    @staticmethod
    def from_response(response: httpx.Response) -> APIStatusError:
        try:
            body = response.json()
        except ValueError:
            body = None
        problem = body if isinstance(body, dict) else {"detail": response.text[:500]}
        cls = _BY_STATUS.get(response.status_code)
        if cls is None:
            cls = InternalServerError if response.status_code >= 500 else APIStatusError
        return cls(response, problem)


class BadRequestError(APIStatusError):
    """400, 413, 415, 422: the request itself is wrong (`invalid_input`, `unknown_model`, ...)."""


class AuthenticationError(APIStatusError):
    """401: missing or invalid API key."""


class PermissionDeniedError(APIStatusError):
    """403: the key lacks the scope the operation needs."""


class NotFoundError(APIStatusError):
    """404: no such job (or not yours)."""


class ConflictError(APIStatusError):
    """409: the job is not in a state that allows this (cancel an ended job, retry a running one)."""


class RateLimitError(APIStatusError):
    """429: rate limit or quota exhausted; `retry_after` says when to come back."""


class InternalServerError(APIStatusError):
    """5xx: the service failed or is saturated (503 `queue_full`, ...)."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: BadRequestError,
    415: BadRequestError,
    422: BadRequestError,
    429: RateLimitError,
}


class JobFailed(SvdServeError):
    """The job ended `error` or `canceled`; `job` is its last status, `code` its error code."""

    def __init__(self, job: JobInfo) -> None:
        self.job = job
        error = job.error or {}
        self.code: str = str(error.get("code") or job.status)
        super().__init__(f"job {job.id} ended {job.status}: {self.code} {error.get('message') or ''}".rstrip())


class JobTimeout(SvdServeError):
    """`wait()` gave up before the job ended (the job itself goes on)."""


class ChecksumMismatch(SvdServeError):
    """A downloaded output's SHA-256 differs from the one the job recorded; the file is removed."""

    def __init__(self, output: str, expected: str, actual: str) -> None:
        self.output, self.expected, self.actual = output, expected, actual
        super().__init__(f"{output}: SHA-256 {actual} does not match the job's {expected}")


def _retry_after(response: httpx.Response, problem: dict[str, Any]) -> float | None:
    header = response.headers.get("retry-after")
    for value in (header, problem.get("retryAfter")):
        try:
            return float(value) if value is not None else None
        except (TypeError, ValueError):
            continue  # an HTTP-date: the body's seconds are tried next
    return None
