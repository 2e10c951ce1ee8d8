"""RFC 9457 problem+json: the one place where errors become HTTP answers."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from serving.errors import Forbidden, RateLimited, SvdServeError, Unauthorized

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


# The methods a route can serve (RFC 9110's registered ones that an API would use).
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path, asked of the routes themselves (Starlette's
    own 405 names only the first route that matched the path, while a path may have several:
    GET and POST on one collection)."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


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
        if isinstance(exc, RateLimited):
            limited = problem(exc.status, exc.code, exc.message, retryAfter=exc.retry_after_s)
            limited.headers.update(exc.headers)  # RateLimit-* of the limit that was hit
            return limited
        response = problem(exc.status, exc.code, exc.message)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = "Bearer"
        elif isinstance(exc, Forbidden):
            response.headers["WWW-Authenticate"] = 'Bearer error="insufficient_scope"'
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(422, "invalid_input", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            detail = f"{request.method} is not allowed here; use {', '.join(allowed)}."
            response = problem(405, code, detail)
            response.headers["Allow"] = ", ".join(allowed)  # RFC 9110: a 405 says what is allowed
            return response
        response = problem(exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The detail goes to the log only: a response never carries internals.
        log.exception("unhandled_error", path=request.url.path)
        response = problem(500, "internal_error", "An internal error occurred.")
        # This handler runs outside every middleware: it sets the request id itself.
        request_id = getattr(request.state, "request_id", None)
        if request_id:
            response.headers["X-Request-ID"] = request_id
            response.headers["X-Content-Type-Options"] = "nosniff"
        return response


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; `code` is stable and part of the API.",
    "type": "object",
    "required": ["type", "title", "status", "code", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "code": {"type": "string"},
        "detail": {"type": "string"},
        "retryAfter": {"type": "integer", "description": "Seconds, as in the Retry-After header (429)."},
    },
}
_AUTH_PROBLEMS = {
    "401": "Missing or invalid API key",
    "403": "The API key lacks the scope this operation needs",
    "429": "Rate limit or quota exhausted; see Retry-After",
}


def install_problem_docs(app: FastAPI) -> None:
    """Make the OpenAPI document say what the handlers above really send: every 4xx/5xx is
    `application/problem+json` (FastAPI documents its own 422 shape, which we never send), every
    authenticated operation may answer 401/403/429, and one with path parameters 404."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = PROBLEM_SCHEMA
        content = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for path, item in schema.get("paths", {}).items():
            for operation in item.values():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                responses = operation["responses"]
                if operation.get("security"):
                    for status, text in _AUTH_PROBLEMS.items():
                        responses.setdefault(status, {"description": text})
                if "{job_id}" in path:
                    responses.setdefault("404", {"description": "No such job (or not yours)"})
                elif "{" in path:
                    responses.setdefault("404", {"description": "Nothing by that name"})
                for status, response in responses.items():
                    if status.startswith(("4", "5")):
                        if status == "422" and response.get("description") == "Validation Error":
                            response["description"] = "Invalid input"
                        response["content"] = content
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
