"""HTTP hardening as plain ASGI middleware: request ids, security headers, rate-limit headers,
and a request-body limit enforced while the body streams in (nothing oversized is buffered)."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import structlog
from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import PayloadTooLarge
from serving.settings import Settings

REQUEST_ID_HEADER = "X-Request-ID"
# A caller's request id is kept when it is short and plain (it ends up in our logs).
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Form fields beside the image, and JSON beside a base64 image, are small.
FIELDS_ALLOWANCE_BYTES = 1024 * 1024
RATE_LIMIT_STATE = "rate_limit_headers"


# The pages the ingress serves itself (the landing page and the console) get a Content Security
# Policy; API answers are JSON, and /docs loads Swagger UI from its CDN, so neither gets this one.
PAGE_PATH_PREFIXES = ("/console",)


def _origin(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") and parts.netloc else None


def console_csp(settings: Settings) -> str:
    """The console's policy: its own scripts and styles only, API calls to this origin only, no
    inline code, no frames, no forms posted elsewhere. Videos and thumbnails come from where the
    outputs are served (this ingress's signed /files URLs, the S3 endpoint or the CDN); an
    image URL typed into the form is previewed as an https image (`img-src https:`), nothing more."""
    media = ["'self'", "blob:"]
    sources = [settings.resolved_public_base_url, settings.cdn_base_url]
    if settings.storage_backend == "s3":
        sources.append(settings.s3_endpoint_url or "https://*.amazonaws.com")
    for origin in filter(None, map(_origin, sources)):
        if origin not in media:
            media.append(origin)
    return "; ".join([
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        f"img-src {' '.join(media)} https:",
        f"media-src {' '.join(media)}",
        "connect-src 'self'",
        "font-src 'none'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])


def request_id_of(scope: Scope) -> str | None:
    state = scope.get("state") or {}
    value = state.get("request_id")
    return value if isinstance(value, str) else None


class SecurityHeadersMiddleware:
    """Every answer carries `X-Request-ID` (the caller's, if sane, else a new one), `nosniff`,
    `X-Frame-Options: DENY`, `Referrer-Policy: no-referrer`; API answers are `no-store` (they
    carry signed URLs); rate-limit headers left in the request state by the auth dependency."""

    def __init__(self, app: ASGIApp, page_csp: str | None = None) -> None:
        self.app = app
        self.page_csp = page_csp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = incoming if incoming and _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        path = str(scope.get("path", ""))
        is_api = path.startswith("/api/")
        is_page = path == "/" or path.startswith(PAGE_PATH_PREFIXES)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if is_api:
                    headers.setdefault("Cache-Control", "no-store")
                if is_page and self.page_csp:
                    headers["Content-Security-Policy"] = self.page_csp
                for name, value in (state.get(RATE_LIMIT_STATE) or {}).items():
                    headers.setdefault(name, value)
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await self.app(scope, receive, send_with_headers)


def body_limit_for(settings: Settings) -> Callable[[str], int]:
    """The largest request body accepted for a content type: an image upload plus its fields,
    a base64 image in JSON, or 1 MiB for anything else."""
    upload = settings.max_upload_bytes

    def limit(content_type: str) -> int:
        if content_type == "multipart/form-data":
            return upload + FIELDS_ALLOWANCE_BYTES
        if content_type == "application/json":
            return math.ceil(upload * 4 / 3) + FIELDS_ALLOWANCE_BYTES
        return FIELDS_ALLOWANCE_BYTES

    return limit


class BodySizeLimitMiddleware:
    """Refuses a body larger than the limit with 413: at once when `Content-Length` says so,
    otherwise as soon as the streamed chunks pass it. The error surfaces from `receive`, inside
    the route, so the one problem+json mapping answers it."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        limit = self.limit_for(content_type)
        declared = headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > limit
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if too_large:
                raise PayloadTooLarge(f"The request body is larger than the {limit}-byte limit.")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"The request body is larger than the {limit}-byte limit.")
            return message

        await self.app(scope, limited_receive, send)


def install_security_middleware(app: FastAPI, settings: Settings) -> None:
    """Body limit innermost, then CORS (only when origins are configured), then request ids and
    headers outermost, so that even a refused preflight or an oversized body carries them."""
    app.add_middleware(BodySizeLimitMiddleware, limit_for=body_limit_for(settings))
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER, "Retry-After", "RateLimit-Limit", "RateLimit-Remaining",
                            "RateLimit-Reset", "RateLimit-Policy"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(SecurityHeadersMiddleware, page_csp=console_csp(settings))
