"""Read a submission: multipart (`image` file + form fields) or JSON (`imageUrl` / `imageBase64`)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, cast

import httpx
from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from serving.errors import InvalidInput, SvdServeError
from serving.ingress.schemas import AnimateJsonBody, AnimateOptions

FETCH_TIMEOUT_S = 15.0


class UnsupportedMediaType(SvdServeError):
    code = "unsupported_media_type"
    status = 415


class PayloadTooLarge(SvdServeError):
    code = "payload_too_large"
    status = 413


@dataclass(frozen=True)
class Submission:
    options: AnimateOptions
    image_bytes: bytes
    source: str  # "upload" | "url" | "base64"


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def _parse_options(model: type[AnimateOptions], data: dict[str, Any]) -> AnimateOptions:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(_validation_message(exc), code="invalid_input") from exc


def _form_to_dict(form: Any) -> dict[str, Any]:
    """Multipart fields arrive as strings; lists and objects as JSON or comma-separated text."""
    data: dict[str, Any] = {}
    for key in form.keys():
        if key == "image":
            continue
        values = form.getlist(key)
        if key == "outputs":
            items: list[str] = []
            for value in values:
                items.extend(v.strip() for v in str(value).split(",") if v.strip())
            data[key] = items
        elif key == "metadata":
            try:
                data[key] = json.loads(values[-1])
            except json.JSONDecodeError as exc:
                raise InvalidInput("`metadata` must be a JSON object.", code="invalid_input") from exc
        else:
            data[key] = values[-1]
    return data


async def read_submission(request: Request, max_bytes: int) -> Submission:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = int(request.headers.get("content-length") or 0)
    if declared > max_bytes + 1024 * 1024:
        raise PayloadTooLarge(f"The request is larger than the {max_bytes}-byte limit.")
    if content_type == "multipart/form-data":
        return await _read_multipart(request, max_bytes)
    if content_type == "application/json":
        return await _read_json(request, max_bytes)
    if not content_type and not declared:
        raise InvalidInput(
            "The request body is empty: send a multipart `image` file or JSON with `imageUrl` or `imageBase64`.",
            code="empty_body",
        )
    raise UnsupportedMediaType(
        f"Content-Type {content_type or 'none'} is not supported; use multipart/form-data or application/json."
    )


async def _read_multipart(request: Request, max_bytes: int) -> Submission:
    # The form owns spooled temp files: the context manager closes them whatever happens.
    async with request.form(max_part_size=max_bytes) as form:
        upload = form.get("image")
        fields = _form_to_dict(form)
        has_url = bool(fields.pop("imageUrl", None) or fields.pop("imageBase64", None))
        if upload is None or not isinstance(upload, UploadFile):
            if has_url:
                raise InvalidInput(
                    "Send `imageUrl` as JSON; multipart requests carry an `image` file.", code="invalid_image_source"
                )
            if not fields:
                raise InvalidInput("The request body is empty: an `image` file is required.", code="empty_body")
            raise InvalidInput("An `image` file is required.", code="missing_image")
        if has_url:
            raise InvalidInput(
                "Send either an `image` file or `imageUrl`/`imageBase64`, not both.", code="invalid_image_source"
            )
        options = _parse_options(AnimateOptions, fields)
        data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"The image is larger than the {max_bytes}-byte limit.")
    return Submission(options=options, image_bytes=data, source="upload")


async def _read_json(request: Request, max_bytes: int) -> Submission:
    raw = await request.body()
    if not raw.strip():
        raise InvalidInput("The request body is empty: send `imageUrl` or `imageBase64`.", code="empty_body")
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"The body is not valid JSON: {exc.msg}.", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise InvalidInput("The JSON body must be an object.", code="invalid_json")
    if not payload:
        raise InvalidInput("The request body is empty: send `imageUrl` or `imageBase64`.", code="empty_body")
    body = cast(AnimateJsonBody, _parse_options(AnimateJsonBody, payload))
    if body.image_url and body.image_base64:
        raise InvalidInput("Send either `imageUrl` or `imageBase64`, not both.", code="invalid_image_source")
    options = AnimateOptions.model_validate(body.model_dump(exclude={"image_url", "image_base64"}))
    if body.image_base64:
        return Submission(options=options, image_bytes=_decode_base64(body.image_base64, max_bytes), source="base64")
    if body.image_url:
        return Submission(options=options, image_bytes=await fetch_image(body.image_url, max_bytes), source="url")
    raise InvalidInput("An image is required: send `imageUrl` or `imageBase64` (or a multipart `image`).", code="missing_image")


def _decode_base64(value: str, max_bytes: int) -> bytes:
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("`imageBase64` is not valid base64.", code="invalid_image") from exc
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"The image is larger than the {max_bytes}-byte limit.")
    return data


async def fetch_image(url: str, max_bytes: int) -> bytes:
    """Download an image with size and time limits. Address filtering (SSRF) is issue #7's."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidInput("`imageUrl` must be an absolute http(s) URL.", code="invalid_image_url")
    try:
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InvalidInput(
                        f"Fetching `imageUrl` answered HTTP {response.status_code}.", code="image_fetch_failed"
                    )
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(f"The image at `imageUrl` is larger than the {max_bytes}-byte limit.")
                    chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise InvalidInput(f"Could not fetch `imageUrl`: {type(exc).__name__}.", code="image_fetch_failed") from exc
    return b"".join(chunks)
