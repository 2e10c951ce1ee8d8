"""svd-serve's Python client: `Client` (sync) and `AsyncClient`, typed errors, job handles.

    from svd_serve_client import Client
    with Client() as client:             # SVD_SERVE_URL, SVD_SERVE_API_KEY
        job = client.submit("cat.png", num_frames=14)
        info = job.wait()                # follows the job's Server-Sent Events
        job.download("cat.mp4")          # SHA-256 checked against the job's checksums
"""

from svd_serve_client._async import AsyncClient, AsyncJob
from svd_serve_client._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ChecksumMismatch,
    ConflictError,
    InternalServerError,
    JobFailed,
    JobTimeout,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    SvdServeError,
)
from svd_serve_client._sync import Client, Job
from svd_serve_client._types import TERMINAL, Event, JobInfo, JobPage
from svd_serve_client._wire import DEFAULT_URL, __version__

__all__ = [
    "APIConnectionError", "APIStatusError", "APITimeoutError", "AsyncClient", "AsyncJob", "AuthenticationError",
    "BadRequestError", "ChecksumMismatch", "Client", "ConflictError", "DEFAULT_URL", "Event", "InternalServerError",
    "Job", "JobFailed", "JobInfo", "JobPage", "JobTimeout", "NotFoundError", "PermissionDeniedError",
    "RateLimitError", "SvdServeError", "TERMINAL", "__version__",
]
