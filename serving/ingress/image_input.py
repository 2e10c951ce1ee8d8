"""Read a submission: multipart (`image` file + form fields) or JSON (`imageUrl` / `imageBase64`).

Sizes are bounded before anything is buffered (the body limit middleware and the declared
`Content-Length`), `imageUrl` is fetched only through `serving.netguard`, and an upload whose
declared media type is not an image (or another image format than its bytes) answers 415."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, cast

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import FetchFailed, InvalidInput, InvalidUrl, PayloadTooLarge, UnsafeUrl, UnsupportedMediaType
from serving.ingress.schemas import AnimateJsonBody, AnimateOptions
from serving.ingress.validation import MAX_METADATA_BYTES, check_metadata, check_storable
from serving.netguard import UrlPolicy, fetch_public, parse_url
from serving.security.images import check_declared_type
from serving.strict_json import loads as strict_loads

FETCH_TIMEOUT_S = 15.0

__all__ = ["FETCH_TIMEOUT_S", "PayloadTooLarge", "Submission", "UnsupportedMediaType", "fetch_image", "read_submission"]


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
        options = model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(_validation_message(exc), code="invalid_input") from exc
    check_storable(options)  # before anything reads the values as text
    check_metadata(options.metadata)
    return options


async def _metadata_part(value: str | UploadFile) -> Any:
    """`metadata` as a form field, or as a file part (`-F 'metadata=@m.json'`): JSON either way."""
    if isinstance(value, UploadFile):
        # Bounded like the field: the JSON of accepted metadata is at most MAX_METADATA_BYTES
        # compact, so four times that covers any indentation a client may send.
        limit = 4 * MAX_METADATA_BYTES
        raw: str | bytes = await value.read(limit + 1)
        if len(raw) > limit:
            raise InvalidInput(f"The `metadata` file is over {limit} bytes.", code="metadata_too_large")
    else:
        raw = value
    try:
        return strict_loads(raw, "`metadata`")
    except InvalidInput as exc:
        raise InvalidInput(f"`metadata` must be a JSON object ({exc.message})", code="invalid_input") from exc


async def _form_to_dict(form: Any) -> dict[str, Any]:
    """Multipart fields arrive as strings; lists and objects as JSON or comma-separated text.
    Only `image` (and `metadata`, as JSON) may be file parts."""
    data: dict[str, Any] = {}
    for key in form.keys():
        if key == "image":
            continue
        values = form.getlist(key)
        if key == "metadata":
            data[key] = await _metadata_part(values[-1])
            continue
        if any(isinstance(value, UploadFile) for value in values):
            raise InvalidInput(f"`{key[:64]}` must be a text field, not a file.", code="invalid_multipart")
        if key == "outputs":
            items: list[str] = []
            for value in values:
                items.extend(v.strip() for v in str(value).split(",") if v.strip())
            data[key] = items
        else:
            data[key] = values[-1]
    return data


async def read_submission(
    request: Request, max_bytes: int, url_policy: UrlPolicy | None = None, fetch_timeout_s: float = FETCH_TIMEOUT_S
) -> Submission:
    """The submission in `request`; `imageUrl` is fetched under `url_policy` (production rules
    when None: https only, public addresses only)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length") or "0"
    declared = int(length) if length.isdigit() else 0
    # Also enforced while streaming by the body limit middleware; here for a declared length.
    limit = (max_bytes * 4 // 3 if content_type == "application/json" else max_bytes) + 1024 * 1024
    if declared > limit:
        raise PayloadTooLarge(f"The request is larger than the {limit}-byte limit.")
    if content_type == "multipart/form-data":
        return await _read_multipart(request, max_bytes)
    if content_type == "application/json":
        return await _read_json(request, max_bytes, url_policy or UrlPolicy(), fetch_timeout_s)
    if not content_type and not declared:
        raise InvalidInput(
            "The request body is empty: send a multipart `image` file or JSON with `imageUrl` or `imageBase64`.",
            code="empty_body",
        )
    raise UnsupportedMediaType(
        f"Content-Type {content_type or 'none'} is not supported; use multipart/form-data or application/json."
    )


async def _read_multipart(request: Request, max_bytes: int) -> Submission:
    try:
        form = await request.form(max_part_size=max_bytes)
    except StarletteHTTPException as exc:  # Starlette's answer to a malformed multipart body
        raise InvalidInput(f"The multipart body is malformed: {exc.detail}", code="invalid_multipart") from exc
    # The form owns spooled temp files: closed whatever happens.
    try:
        upload = form.get("image")
        has_url = any(form.get(name) for name in ("imageUrl", "imageBase64"))
        if upload is None or not isinstance(upload, UploadFile):
            if has_url:
                raise InvalidInput(
                    "Send `imageUrl` as JSON; multipart requests carry an `image` file.", code="invalid_image_source"
                )
            if not any(key != "image" for key in form.keys()):
                raise InvalidInput("The request body is empty: an `image` file is required.", code="empty_body")
            raise InvalidInput("An `image` file is required.", code="missing_image")
        if has_url:
            raise InvalidInput(
                "Send either an `image` file or `imageUrl`/`imageBase64`, not both.", code="invalid_image_source"
            )
        fields = await _form_to_dict(form)
        options = _parse_options(AnimateOptions, fields)
        if upload.size is not None and upload.size > max_bytes:
            raise PayloadTooLarge(f"The image is larger than the {max_bytes}-byte limit.")
        data = await upload.read(max_bytes + 1)
        declared_type = upload.content_type
    finally:
        await form.close()
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"The image is larger than the {max_bytes}-byte limit.")
    check_declared_type(declared_type, data)
    return Submission(options=options, image_bytes=data, source="upload")


async def _read_json(request: Request, max_bytes: int, url_policy: UrlPolicy, fetch_timeout_s: float) -> Submission:
    raw = await request.body()
    if not raw.strip():
        raise InvalidInput("The request body is empty: send `imageUrl` or `imageBase64`.", code="empty_body")
    payload = strict_loads(raw, "The body")
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
        image = await fetch_image(body.image_url, max_bytes, url_policy, fetch_timeout_s)
        return Submission(options=options, image_bytes=image, source="url")
    raise InvalidInput("An image is required: send `imageUrl` or `imageBase64` (or a multipart `image`).", code="missing_image")


def _decode_base64(value: str, max_bytes: int) -> bytes:
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    if len(value) * 3 // 4 > max_bytes + 3:  # decoded size, known before decoding
        raise PayloadTooLarge(f"The image is larger than the {max_bytes}-byte limit.")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("`imageBase64` is not valid base64.", code="invalid_image") from exc
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"The image is larger than the {max_bytes}-byte limit.")
    return data


async def fetch_image(
    url: str, max_bytes: int, policy: UrlPolicy | None = None, timeout_s: float = FETCH_TIMEOUT_S
) -> bytes:
    """Download `imageUrl` through the SSRF guard, with size and time limits."""
    try:
        parsed = parse_url(url)
    except InvalidUrl as exc:
        raise InvalidUrl(f"`imageUrl` is refused: {exc.message}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise InvalidInput("`imageUrl` must be an absolute http(s) URL.", code="invalid_image_url")
    try:
        return await fetch_public(url, max_bytes=max_bytes, timeout_s=timeout_s, policy=policy or UrlPolicy())
    except UnsafeUrl as exc:  # InvalidUrl included: the same class, with the field named
        raise type(exc)(f"`imageUrl` is refused: {exc.message}") from exc
    except PayloadTooLarge as exc:
        raise PayloadTooLarge(f"The image at `imageUrl` is larger than the {max_bytes}-byte limit.") from exc
    except FetchFailed as exc:
        raise InvalidInput(f"Could not fetch `imageUrl`: {exc.message}", code="image_fetch_failed") from exc


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` inlined, to embed in the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    inlined: dict[str, Any] = resolve(schema)
    return inlined


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    variants = [v for v in prop.get("anyOf", []) if v.get("type") != "null"]
    if len(variants) != 1:
        return prop
    kept = {k: v for k, v in prop.items() if k != "anyOf" and not (k == "default" and v is None)}
    return {**kept, **variants[0]}


def submission_request_body() -> dict[str, Any]:
    """The OpenAPI `requestBody` of a submission: the route reads the body itself (multipart or
    JSON), so FastAPI cannot derive it."""
    options = _inline_defs(AnimateOptions.model_json_schema(by_alias=True))
    as_json = _inline_defs(AnimateJsonBody.model_json_schema(by_alias=True))
    multipart = {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"},
            # A form field is present or absent, never null.
            **{name: _without_null(prop) for name, prop in options.get("properties", {}).items()},
        },
        "additionalProperties": False,
    }
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": multipart},
            "application/json": {"schema": as_json},
        },
    }


async def read_options(request: Request) -> AnimateOptions:
    """The fields of a submission without its image, as a JSON object (the estimate endpoint);
    an empty body means every default. Parsed exactly as a submission's fields are."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await request.body()
    if not raw.strip():
        return AnimateOptions()
    if content_type != "application/json":
        raise UnsupportedMediaType(f"Content-Type {content_type or 'none'} is not supported; use application/json.")
    payload = strict_loads(raw, "The body")  # duplicate keys, NaN, depth: refused as for a submission
    if not isinstance(payload, dict):
        raise InvalidInput("The JSON body must be an object.", code="invalid_json")
    try:
        # JSON types as declared (`"cache": 0` is not a boolean), as the OpenAPI document says.
        options = AnimateOptions.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise InvalidInput(_validation_message(exc), code="invalid_input") from exc
    check_storable(options)
    check_metadata(options.metadata)
    return options


def options_request_body() -> dict[str, Any]:
    """The OpenAPI `requestBody` of the estimate: a submission's fields, no image."""
    schema = _inline_defs(AnimateOptions.model_json_schema(by_alias=True))
    return {"required": False, "content": {"application/json": {"schema": schema}}}
