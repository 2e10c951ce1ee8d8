"""RFC 9457 problem+json: the one place where errors become HTTP answers."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import SvdServeError

log = structlog.get_logger(__name__)

PROBLEM_TYPE_BASE = "https://svd-serve.dev/problems/"


def problem(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    body = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": code.replace("_", " "),
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    headers = {"Retry-After": str(extra["retryAfter"])} if "retryAfter" in extra else None
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(SvdServeError)
    async def _svd_error(request: Request, exc: SvdServeError) -> JSONResponse:
        if exc.status >= 500:
            log.error("request_failed", code=exc.code, error=exc.message, path=request.url.path)
        return problem(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(422, "invalid_input", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return problem(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The detail goes to the log only: a response never carries internals.
        log.exception("unhandled_error", path=request.url.path)
        return problem(500, "internal_error", "An internal error occurred.")
