"""Hostile input over HTTP: bombs, truncated files, polyglots, wrong types, empty and oversized
files, hostile JSON, text and URLs. Each answers 4xx fast and leaves nothing behind (no object, no
row, no queue entry); the service keeps accepting good input afterwards.

Store-agnostic: every test on a running ingress runs against PostgreSQL and against SQLite (the
`database_url` fixture), because the two refuse different things (NUL, NaN) and a test on one
store is half a test."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from serving.db.migrate import upgrade
from serving.security.images import hidden_trailer, sniff_format
from tests.serving.test_api_keys import App, app_settings, png_bytes, running_app
from tests.serving.test_netguard import HttpServer, Route, TrapListener

MAX_UPLOAD = 256 * 1024
WEBHOOK_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD3CUf1w/Iw6s="


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(side: int = 30000) -> bytes:
    """A real decompression bomb: a 1-bit PNG of side x side zero pixels (~112 MB raw) whose
    IDAT compresses to ~110 KB."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side * (side // 8 + 1)), 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def encoded(fmt: str, size: tuple[int, int] = (64, 48), **save: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(buf, format=fmt, **save)
    return buf.getvalue()


def jpeg_pixel_flood() -> bytes:
    """A small JPEG whose frame header claims 65000 x 65000 pixels."""
    data = bytearray(encoded("JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def webp_canvas_flood() -> bytes:
    """An extended WebP whose canvas claims 16384 x 16384 pixels."""
    image = Image.new("RGB", (16, 16))
    exif = image.getexif()
    exif[0x0112] = 1
    buf = io.BytesIO()
    image.save(buf, format="WEBP", exif=exif.tobytes())
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"VP8X"
    data[24:27] = (16383).to_bytes(3, "little")
    data[27:30] = (16383).to_bytes(3, "little")
    return bytes(data)


def jpeg_with_comment(data: bytes, comment: bytes) -> bytes:
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return data[:2] + segment + data[2:]


def zip_bytes() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("evil.jsp", "<% Runtime.getRuntime().exec(request.getParameter(\"c\")); %>")
    return buf.getvalue()


HTML = b"<html><body><script>alert(document.cookie)</script></body></html>"

# (case, file bytes, declared part type, status, code)
HOSTILE_FILES = [
    ("png decompression bomb", png_bomb(), "image/png", 422, "image_too_large"),
    ("jpeg pixel flood", jpeg_pixel_flood(), "image/jpeg", 422, "image_too_large"),
    ("webp canvas flood", webp_canvas_flood(), "image/webp", 422, "image_too_large"),
    ("truncated png", png_bytes((300, 200))[:400], "image/png", 422, "invalid_image"),
    ("truncated jpeg", encoded("JPEG", (300, 200))[:600], "image/jpeg", 422, "invalid_image"),
    ("truncated webp", encoded("WEBP", (300, 200))[:100], "image/webp", 422, "invalid_image"),
    ("png + zip polyglot", png_bytes() + zip_bytes(), "image/png", 422, "invalid_image"),
    ("jpeg + html polyglot", encoded("JPEG") + HTML, "image/jpeg", 422, "invalid_image"),
    ("webp + script polyglot", encoded("WEBP") + b"<script>alert(1)</script>", "image/webp", 422, "invalid_image"),
    ("gif + jar (gifar)", encoded("GIF") + zip_bytes(), "image/gif", 415, "unsupported_image_type"),
    ("html declared as png", HTML, "image/png", 422, "invalid_image"),
    ("png declared as html", png_bytes(), "text/html", 415, "unsupported_image_type"),
    ("png declared as svg", png_bytes(), "image/svg+xml", 415, "unsupported_image_type"),
    ("png declared as jpeg", png_bytes(), "image/jpeg", 415, "image_type_mismatch"),
    ("gif as octet-stream", encoded("GIF"), "application/octet-stream", 415, "unsupported_image_format"),
    ("bmp", encoded("BMP"), "application/octet-stream", 415, "unsupported_image_format"),
    ("tiff", encoded("TIFF"), "application/octet-stream", 415, "unsupported_image_format"),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>', "application/octet-stream", 415,
     "unsupported_image_format"),
    ("zero bytes", b"", "image/png", 422, "empty_image"),
    ("oversized file", png_bytes() + b"\x00" * (MAX_UPLOAD + 1), "image/png", 413, "payload_too_large"),
]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    return url


@pytest.fixture
def owner(unique_prefix: str) -> str:
    """The caller of one test: its own owner, so that "nothing stored" holds on the session's
    shared PostgreSQL database too."""
    return f"mallory-{unique_prefix}"


@pytest.fixture
async def app(database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> AsyncIterator[App]:
    settings = app_settings(database_url, redis_url, unique_prefix, tmp_path, max_upload_bytes=MAX_UPLOAD,
                            outbound_allowed_networks=["127.0.0.2/32"], webhook_secrets=WEBHOOK_SECRET)
    async with running_app(settings) as running:
        yield running


@pytest.fixture
async def client(app: App, owner: str) -> AsyncIterator[httpx.AsyncClient]:
    async with app.client(await app.new_key(owner)) as c:
        yield c


@pytest.fixture
def trap() -> Iterator[TrapListener]:
    listener = TrapListener()
    yield listener
    listener.close()


@pytest.fixture
def public_server() -> Iterator[HttpServer]:
    server = HttpServer("127.0.0.2")  # trusted by `outbound_allowed_networks`: our "internet"
    yield server
    server.close()


async def assert_nothing_left(app: App, owner: str) -> None:
    assert app.stored_objects() == []
    assert await app.queued() == 0
    assert (await app.services.jobs.list_for_owner(owner, limit=10))[0] == []


async def assert_still_serving(client: httpx.AsyncClient) -> None:
    good = await client.post("/api/v1/animate-image", files={"image": ("ok.png", png_bytes(), "image/png")})
    assert good.status_code == 202, good.text


@pytest.mark.parametrize("case,data,declared,status,code", HOSTILE_FILES, ids=[c[0] for c in HOSTILE_FILES])
async def test_hostile_files_are_refused(
    app: App, owner: str, client: httpx.AsyncClient, case: str, data: bytes, declared: str, status: int, code: str
) -> None:
    response = await client.post("/api/v1/animate-image", files={"image": ("upload", data, declared)},
                                 data={"numFrames": "4"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code
    assert response.headers["x-request-id"]
    await assert_nothing_left(app, owner)
    # The same bytes as base64 JSON are refused alike (only the size limit answers first there).
    if data and declared.startswith("image/") and status != 415:
        as_json = await client.post("/api/v1/animate-image", json={"imageBase64": base64.b64encode(data).decode()})
        assert as_json.status_code == status and as_json.json()["code"] == code
        await assert_nothing_left(app, owner)
    await assert_still_serving(client)


async def test_body_limit_stops_a_streamed_upload_early(app: App, owner: str, client: httpx.AsyncClient) -> None:
    """Without Content-Length the body is refused once it passes the limit: far from all of a
    10 MB stream is read."""
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        boundary = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n" \
                   b"Content-Type: image/png\r\n\r\n"
        yield boundary
        for _ in range(160):
            sent += 65536
            yield b"\x00" * 65536

    response = await client.post("/api/v1/animate-image", content=body(),
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"
    assert sent < 4 * 1024 * 1024
    declared = await client.post("/api/v1/animate-image", content=b"x",
                                 headers={"Content-Type": "application/json", "Content-Length": str(10**9)})
    assert declared.status_code == 413
    await assert_nothing_left(app, owner)


async def test_exif_orientation_is_applied_and_only_pixels_are_stored(app: App, client: httpx.AsyncClient) -> None:
    source = Image.new("RGB", (60, 40), (250, 0, 0))
    exif = source.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    source.save(buf, format="JPEG", exif=exif.tobytes())
    commented = jpeg_with_comment(buf.getvalue(), b"<script>alert(1)</script>")  # a JPEG/HTML polyglot
    response = await client.post("/api/v1/animate-image", files={"image": ("p.jpg", commented, "image/jpeg")})
    assert response.status_code == 202, response.text
    (stored,) = app.stored_objects()
    raw = stored.read_bytes()
    assert raw.startswith(b"\x89PNG") and b"<script>" not in raw and b"Exif" not in raw
    with Image.open(io.BytesIO(raw)) as image:
        assert image.size == (40, 60) and image.format == "PNG"


HOSTILE_JSON = [
    ("nested arrays", b'{"imageBase64": "x", "metadata": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", 422, "invalid_json"),
    ("nested body", b"[" * 200_000, 422, "invalid_json"),
    ("metadata too big", b'{"imageBase64": "aGk=", "metadata": {"a": "' + b"x" * 20_000 + b'"}}', 422,
     "metadata_too_large"),
    ("metadata too deep", b'{"imageBase64": "aGk=", "metadata": ' + b'{"a":' * 12 + b"1" + b"}" * 12 + b"}", 422,
     "metadata_too_large"),
    ("prompt too long", b'{"imageBase64": "aGk=", "prompt": "' + b"p" * 2001 + b'"}', 422, "invalid_input"),
    ("huge numFrames", b'{"imageBase64": "aGk=", "numFrames": 1' + b"0" * 40 + b"}", 422, "invalid_num_frames"),
    ("NaN noise", b'{"imageBase64": "aGk=", "noiseAugStrength": NaN}', 422, "invalid_json"),  # not JSON
    ("negative seed", b'{"imageBase64": "aGk=", "seed": -1}', 422, "invalid_input"),
    ("fps out of range", b'{"imageBase64": "aGk=", "fps": 1000}', 422, "invalid_input"),
    ("not an object", b'"just a string"', 422, "invalid_json"),
]


@pytest.mark.parametrize("case,body,status,code", HOSTILE_JSON, ids=[c[0] for c in HOSTILE_JSON])
async def test_hostile_json_is_refused(app: App, owner: str, client: httpx.AsyncClient, case: str, body: bytes,
                                       status: int, code: str) -> None:
    valid = base64.b64encode(png_bytes()).decode().encode()
    response = await client.post("/api/v1/animate-image", content=body.replace(b'"aGk="', b'"' + valid + b'"'),
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    await assert_nothing_left(app, owner)


# Text and JSON that PostgreSQL cannot store (SQLite can), or that is not JSON at all. Each was a
# 500 on PostgreSQL, or a 202 whose status echoed `null` and whose webhook carried a bare NaN.
HOSTILE_TEXT = [
    ("NUL in prompt", b'{"imageBase64": "aGk=", "prompt": "a\\u0000b"}', "invalid_input"),
    ("NUL in model", b'{"imageBase64": "aGk=", "model": "tiny-random\\u0000"}', "invalid_input"),
    ("NUL in a metadata value", b'{"imageBase64": "aGk=", "metadata": {"k": "a\\u0000"}}', "invalid_input"),
    ("NUL in a metadata key", b'{"imageBase64": "aGk=", "metadata": {"k\\u0000": 1}}', "invalid_input"),
    ("NUL deep in metadata", b'{"imageBase64": "aGk=", "metadata": {"a": [{"b": "\\u0000"}]}}', "invalid_input"),
    ("lone surrogate in a metadata value", b'{"imageBase64": "aGk=", "metadata": {"x": "\\ud800"}}', "invalid_json"),
    ("lone surrogate in a metadata key", b'{"imageBase64": "aGk=", "metadata": {"\\udc00": 1}}', "invalid_json"),
    ("lone surrogate in prompt", b'{"imageBase64": "aGk=", "prompt": "\\udfff"}', "invalid_json"),
    ("NaN in metadata", b'{"imageBase64": "aGk=", "metadata": {"x": NaN}}', "invalid_json"),
    ("Infinity in metadata", b'{"imageBase64": "aGk=", "metadata": {"x": Infinity}}', "invalid_json"),
    ("-Infinity deep in metadata", b'{"imageBase64": "aGk=", "metadata": {"a": [1, -Infinity]}}', "invalid_json"),
]


@pytest.mark.parametrize("case,body,code", HOSTILE_TEXT, ids=[c[0] for c in HOSTILE_TEXT])
async def test_text_no_store_can_keep_is_refused(app: App, owner: str, client: httpx.AsyncClient, case: str,
                                                 body: bytes, code: str) -> None:
    valid = base64.b64encode(png_bytes()).decode().encode()
    response = await client.post("/api/v1/animate-image", content=body.replace(b'"aGk="', b'"' + valid + b'"'),
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    await assert_nothing_left(app, owner)
    await assert_still_serving(client)


# (case, text fields, extra file parts, code): multipart forms of the same, and `metadata` as a file.
HOSTILE_FORMS: list[tuple[str, dict[str, str], dict[str, tuple[str, bytes, str]], str]] = [
    ("NUL in prompt", {"prompt": "a\x00b"}, {}, "invalid_input"),
    ("NUL in a metadata field", {"metadata": '{"k": "\\u0000"}'}, {}, "invalid_input"),
    ("NaN in a metadata field", {"metadata": '{"x": NaN}'}, {}, "invalid_input"),
    ("lone surrogate in a metadata field", {"metadata": '{"x": "\\ud800"}'}, {}, "invalid_input"),
    ("metadata file of invalid JSON", {}, {"metadata": ("m.json", b"{nope", "application/json")}, "invalid_input"),
    ("metadata file that is not an object", {}, {"metadata": ("m.json", b"[1, 2]", "application/json")},
     "invalid_input"),
    ("metadata file of binary", {}, {"metadata": ("m.bin", b"\xff\xfe\x00\x01", "application/octet-stream")},
     "invalid_input"),
    ("metadata file with Infinity", {}, {"metadata": ("m.json", b'{"x": Infinity}', "application/json")},
     "invalid_input"),
    ("metadata file too large", {}, {"metadata": ("m.json", b'{"a": "' + b"x" * 70_000 + b'"}', "application/json")},
     "metadata_too_large"),
    ("prompt as a file", {}, {"prompt": ("p.txt", b"a cat", "text/plain")}, "invalid_multipart"),
]


@pytest.mark.parametrize("case,fields,parts,code", HOSTILE_FORMS, ids=[c[0] for c in HOSTILE_FORMS])
async def test_hostile_form_fields_are_refused(app: App, owner: str, client: httpx.AsyncClient, case: str,
                                               fields: dict[str, str], parts: dict[str, tuple[str, bytes, str]],
                                               code: str) -> None:
    files = {"image": ("a.png", png_bytes(), "image/png"), **parts}
    response = await client.post("/api/v1/animate-image", files=files, data=fields)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    await assert_nothing_left(app, owner)
    await assert_still_serving(client)


async def test_metadata_as_a_file_part_and_unusual_text_are_kept_intact(app: App, client: httpx.AsyncClient) -> None:
    """What is valid is stored and read back exactly, on both stores: metadata sent as a file
    part, and text far from ASCII (an astral emoji arrives as an escaped surrogate pair)."""
    metadata = {"name": "caf\u00e9 \u05e9\u05dc\u05d5\u05dd", "emoji": "\U0001F600", "n": [1, 2.5, None, True]}
    as_file = await client.post("/api/v1/animate-image", files={
        "image": ("a.png", png_bytes(), "image/png"),
        "metadata": ("m.json", json.dumps(metadata, indent=2).encode(), "application/json"),
    }, data={"prompt": "\u00fcber \U0001F3A5"})
    assert as_file.status_code == 202, as_file.text
    escaped = json.dumps({"imageBase64": base64.b64encode(png_bytes()).decode(), "metadata": metadata})
    assert "\\ud83d\\ude00" in escaped  # json.dumps writes the emoji as a surrogate pair
    as_json = await client.post("/api/v1/animate-image", content=escaped, headers={"Content-Type": "application/json"})
    assert as_json.status_code == 202, as_json.text
    for accepted in (as_file, as_json):
        status = (await client.get(f"/api/v1/animate-image/status/{accepted.json()['jobId']}")).json()
        assert status["metadata"] == metadata
    first = await client.get(f"/api/v1/animate-image/status/{as_file.json()['jobId']}")
    assert first.json()["prompt"] == "\u00fcber \U0001F3A5"


MALFORMED_HOSTS = [
    "http://" + "a" * 64 + ".example.com/x.png",  # a label over 63 characters
    "http://a..example.com/x.png",  # an empty label
    "http://xn--a.com/x.png",  # punycode that is not IDNA
]


async def test_malformed_hosts_are_422_for_image_and_webhook_urls(app: App, owner: str, client: httpx.AsyncClient,
                                                                   trap: TrapListener) -> None:
    for url in MALFORMED_HOSTS:
        as_image = await client.post("/api/v1/animate-image", json={"imageUrl": url})
        assert as_image.status_code == 422, (url, as_image.text)
        assert as_image.json()["code"] == "invalid_url" and "`imageUrl`" in as_image.json()["detail"]
        as_webhook = await client.post("/api/v1/animate-image", files={"image": ("a.png", png_bytes(), "image/png")},
                                       data={"webhookUrl": url})
        assert as_webhook.status_code == 422, (url, as_webhook.text)
        assert as_webhook.json()["code"] == "invalid_url" and "`webhookUrl`" in as_webhook.json()["detail"]
    await assert_nothing_left(app, owner)
    assert trap.accepted == 0
    await assert_still_serving(client)


async def test_wrong_request_content_types(app: App, owner: str, client: httpx.AsyncClient) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "image/png", "text/html"):
        response = await client.post("/api/v1/animate-image", content=png_bytes(), headers={"Content-Type": content_type})
        assert response.status_code == 415, content_type
        assert response.json()["code"] == "unsupported_media_type"
    await assert_nothing_left(app, owner)


async def test_image_url_ssrf_through_the_api(app: App, owner: str, client: httpx.AsyncClient, trap: TrapListener,
                                              public_server: HttpServer) -> None:
    public_server.routes["/cat.png"] = Route(body=png_bytes(), headers={"Content-Type": "image/png"})
    public_server.routes["/hop"] = Route(status=302, headers={"Location": f"http://127.0.0.1:{trap.port_v4}/cat.png"})
    public_server.routes["/big.png"] = Route(body=png_bytes() + b"\x00" * MAX_UPLOAD)
    base = f"http://127.0.0.2:{public_server.port}"
    for url in (f"http://127.0.0.1:{trap.port_v4}/x.png", f"http://[::1]:{trap.port_v6}/x.png",
                f"http://localhost:{trap.port_v4}/x.png", f"http://2130706433:{trap.port_v4}/x.png",
                "http://169.254.169.254/latest/meta-data/", f"{base}/hop"):
        response = await client.post("/api/v1/animate-image", json={"imageUrl": url})
        assert response.status_code == 422 and response.json()["code"] == "unsafe_url", (url, response.text)
    for url in ("file:///etc/passwd", "gopher://127.0.0.1:70/", "ftp://example.com/x.png"):
        response = await client.post("/api/v1/animate-image", json={"imageUrl": url})
        assert response.status_code == 422 and response.json()["code"] == "invalid_image_url", url
    too_big = await client.post("/api/v1/animate-image", json={"imageUrl": f"{base}/big.png"})
    assert too_big.status_code == 413
    assert trap.accepted == 0
    await assert_nothing_left(app, owner)
    ok = await client.post("/api/v1/animate-image", json={"imageUrl": f"{base}/cat.png"})
    assert ok.status_code == 202, ok.text


async def test_http_image_urls_are_refused_in_production(
    sqlite_url: str, redis_url: str, unique_prefix: str, tmp_path: Path, public_server: HttpServer
) -> None:
    public_server.routes["/cat.png"] = Route(body=png_bytes())
    settings = app_settings(sqlite_url, redis_url, unique_prefix, tmp_path, environment="production",
                            url_signing_secret="prod-signing-secret", api_keys="ops:prod-static-key-1",
                            outbound_allowed_networks=["127.0.0.2/32"])
    async with running_app(settings) as app, app.client("prod-static-key-1") as client:
        response = await client.post("/api/v1/animate-image",
                                     json={"imageUrl": f"http://127.0.0.2:{public_server.port}/cat.png"})
        assert response.status_code == 422 and response.json()["code"] == "unsafe_url"
        assert "https" in response.json()["detail"]
    assert public_server.requests == 0


def test_trailer_detection_keeps_legitimate_files() -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        clean = encoded(fmt)
        assert sniff_format(clean) == fmt and hidden_trailer(clean, fmt) == b""
        assert hidden_trailer(clean + b"\x00\x00\r\n", fmt) == b""  # padding is not a payload
        assert hidden_trailer(clean + b"PK\x03\x04", fmt) == b"PK\x03\x04"
    progressive = encoded("JPEG", (200, 120), progressive=True, quality=90)
    assert hidden_trailer(progressive, "JPEG") == b""
    mpf_like = encoded("JPEG") + encoded("JPEG", (16, 16))  # a phone's appended preview image
    assert hidden_trailer(mpf_like, "JPEG") == b""


async def test_security_headers_and_request_ids(app: App, client: httpx.AsyncClient) -> None:
    answers = [
        await client.get("/api/v1/animate-image"),
        await client.get("/api/v1/animate-image/status/not-a-uuid"),
        await client.post("/api/v1/animate-image", content=b"x", headers={"Content-Type": "text/plain"}),
        await client.get("/healthz"),
        await client.get("/no/such/route"),
    ]
    ids = [a.headers["x-request-id"] for a in answers]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY" and answer.headers["referrer-policy"] == "no-referrer"
        assert "access-control-allow-origin" not in answer.headers
    assert answers[0].headers["cache-control"] == "no-store"
    assert answers[0].headers["ratelimit-limit"] == "50"
    # A caller's own request id is echoed when it is plain; anything else is replaced.
    mine = await client.get("/healthz", headers={"X-Request-ID": "backend-req-42"})
    assert mine.headers["x-request-id"] == "backend-req-42"
    hostile = await client.get("/healthz", headers={"X-Request-ID": "x\" onload=alert(1) " + "y" * 300})
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["x-request-id"])
    # CORS: no preflight answer for anyone unless origins are configured.
    preflight = await client.options("/api/v1/animate-image", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


async def test_unexpected_errors_keep_the_request_id(app: App, owner: str, monkeypatch: pytest.MonkeyPatch) -> None:
    key = await app.new_key(owner)

    async def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("database password is hunter2")

    monkeypatch.setattr(app.services.jobs, "list_for_owner", broken)
    transport = httpx.ASGITransport(app=app.transport.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                 headers={"Authorization": f"Bearer {key}", "X-Request-ID": "trace-500"}) as c:
        response = await c.get("/api/v1/animate-image")
    assert response.status_code == 500 and response.json()["code"] == "internal_error"
    assert response.headers["x-request-id"] == "trace-500" and "hunter2" not in response.text


async def test_cors_only_for_configured_origins(sqlite_url: str, redis_url: str, unique_prefix: str,
                                                tmp_path: Path) -> None:
    settings = app_settings(sqlite_url, redis_url, unique_prefix, tmp_path,
                            cors_allow_origins=["https://app.example"])
    async with running_app(settings) as running, running.client() as anonymous:
        allowed = await anonymous.options("/api/v1/animate-image", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-credentials" not in allowed.headers
        other = await anonymous.options("/api/v1/animate-image", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
        simple = await anonymous.get("/healthz", headers={"Origin": "https://app.example"})
        assert simple.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()


def test_a_bomb_is_refused_from_its_header_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pixel limit is checked on the size the header declares: the bomb's pixels are never
    decoded (what "refused fast" means, without timing a busy machine)."""
    from PIL import Image, ImageFile

    from serving.errors import InvalidInput
    from serving.security.images import decode_and_reencode

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(InvalidInput) as refused:
        decode_and_reencode(png_bomb(), "PNG", max_pixels=4096 * 4096, max_side=8192)
    assert refused.value.code == "image_too_large"
