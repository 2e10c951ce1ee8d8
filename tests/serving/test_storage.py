"""Object storage: the same behaviour from the local backend and from S3 on a real SeaweedFS."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest

from serving.errors import NotFound
from serving.settings import Settings
from serving.storage import LocalStorage, ObjectStorage, S3Storage, make_storage
from tests.s3_server import S3Endpoint

BASE_URL = "http://svd.test:8000"
SECRET = "test-signing-secret"


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def unconfigured_s3(endpoint: S3Endpoint, secret: str | None = None) -> S3Storage:
    """An S3Storage on a fresh bucket name, not created yet."""
    return S3Storage(
        bucket=f"t-{uuid.uuid4().hex[:12]}",
        endpoint_url=endpoint.endpoint_url,
        region=endpoint.region,
        access_key_id=endpoint.access_key_id,
        secret_access_key=secret or endpoint.secret_access_key,
    )


def drop_bucket(storage: S3Storage) -> None:
    """Empty and remove a test's bucket (each bucket holds a SeaweedFS volume)."""
    client = storage.client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=storage.bucket, Key=item["Key"])
    client.delete_bucket(Bucket=storage.bucket)


@pytest.fixture
def s3_storage(s3_endpoint: S3Endpoint) -> Iterator[S3Storage]:
    """An S3Storage on its own new bucket, dropped after the test."""
    storage = unconfigured_s3(s3_endpoint)
    storage.ensure_bucket()
    yield storage
    drop_bucket(storage)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> LocalStorage | S3Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "storage", BASE_URL, SECRET)
    s3: S3Storage = request.getfixturevalue("s3_storage")
    return s3


@pytest.fixture(params=["local", "s3"])
def bucketless_storage(request: pytest.FixtureRequest, tmp_path: Path) -> LocalStorage | S3Storage:
    """For validation tests: an S3Storage whose bucket does not exist, so a request that
    slipped past validation would fail with a boto error rather than a ValueError."""
    if request.param == "local":
        return LocalStorage(tmp_path / "storage", BASE_URL, SECRET)
    return unconfigured_s3(request.getfixturevalue("s3_endpoint"))


def _signed(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    key = unquote(parts.path.removeprefix("/files/"))
    return key, int(query["expires"][0]), query["signature"][0]


def download(storage: LocalStorage | S3Storage, url: str) -> tuple[bytes, str]:
    """Fetch a URL as a client would: over HTTP for S3, through `verify` + `path` for local
    (exactly what the ingress's /files route does)."""
    if isinstance(storage, S3Storage):
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200, response.text
        return response.content, response.headers["content-type"]
    assert url.startswith(f"{BASE_URL}/files/")
    key, expires, signature = _signed(url)
    assert storage.verify(key, expires, signature)
    return storage.path(key).read_bytes(), storage.content_type(key)


# Behaviour shared by both backends -----------------------------------------------------------


def test_both_backends_satisfy_the_protocol(storage: LocalStorage | S3Storage) -> None:
    assert isinstance(storage, ObjectStorage)


def test_put_get_exists_delete_round_trip(storage: LocalStorage | S3Storage) -> None:
    key = "owner-1/job-1/video.mp4"
    assert not storage.exists(key)
    storage.put(key, b"first", "video/mp4")
    assert storage.exists(key)
    assert storage.get(key) == b"first"
    storage.put(key, b"second, longer", "video/mp4")  # overwrite
    assert storage.get(key) == b"second, longer"
    storage.delete(key)
    assert not storage.exists(key)
    storage.delete(key)  # deleting a missing object is fine


def test_get_missing_key_raises_not_found(storage: LocalStorage | S3Storage) -> None:
    with pytest.raises(NotFound):
        storage.get("owner-1/no-such-job/video.mp4")


def test_empty_object_round_trip(storage: LocalStorage | S3Storage) -> None:
    storage.put("o/j/empty.bin", b"", "application/octet-stream")
    assert storage.exists("o/j/empty.bin")
    assert storage.get("o/j/empty.bin") == b""


def test_content_type_and_cache_control_preserved(storage: LocalStorage | S3Storage) -> None:
    storage.put("o/j/video.mp4", b"v", "video/mp4", cache_control="private, max-age=3600")
    storage.put("o/j/thumbnail.jpg", b"t", "image/jpeg")
    assert storage.content_type("o/j/video.mp4") == "video/mp4"
    assert storage.content_type("o/j/thumbnail.jpg") == "image/jpeg"
    if isinstance(storage, S3Storage):
        head = storage.client.head_object(Bucket=storage.bucket, Key="o/j/video.mp4")
        assert head["ContentType"] == "video/mp4"
        assert head["CacheControl"] == "private, max-age=3600"
    else:
        assert storage.cache_control("o/j/video.mp4") == "private, max-age=3600"
        assert storage.cache_control("o/j/thumbnail.jpg") is None
    with pytest.raises(NotFound):
        storage.content_type("o/j/missing.mp4")


def test_delete_prefix_removes_only_that_folder(storage: LocalStorage | S3Storage) -> None:
    doomed = ["alice/job1/video.mp4", "alice/job1/thumbnail.jpg", "alice/job1/extra/frame.png"]
    kept = ["alice/job10/video.mp4", "alice/job2/video.mp4", "bob/job1/video.mp4"]
    for key in doomed + kept:
        storage.put(key, key.encode(), "application/octet-stream")

    # No trailing slash still means the folder: alice/job10 must survive alice/job1.
    assert storage.delete_prefix("alice/job1") == len(doomed)
    assert not any(storage.exists(key) for key in doomed)
    assert all(storage.get(key) == key.encode() for key in kept)
    assert storage.delete_prefix("alice/job1/") == 0
    assert storage.delete_prefix("nobody/") == 0


def test_url_downloads_the_object(storage: LocalStorage | S3Storage) -> None:
    key = "owner 1/job-1/video.mp4"  # a space must survive quoting
    data = os.urandom(50_000)
    storage.put(key, data, "video/mp4")
    body, content_type = download(storage, storage.url(key, ttl_s=300))
    assert body == data
    assert content_type == "video/mp4"


def test_uri(storage: LocalStorage | S3Storage) -> None:
    if isinstance(storage, S3Storage):
        assert storage.uri("o/j/video.mp4") == f"s3://{storage.bucket}/o/j/video.mp4"
    else:
        assert storage.uri("o/j/video.mp4") == "local://o/j/video.mp4"


BAD_KEYS = ["", "/abs/key", "a//b", "a/b/", "a/../b", "..", "a/./b", "a\\b", "a/b\x00c", "a\nb"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused(bucketless_storage: LocalStorage | S3Storage, key: str) -> None:
    storage = bucketless_storage
    calls: list[Callable[[], object]] = [
        lambda: storage.put(key, b"x", "text/plain"),
        lambda: storage.get(key),
        lambda: storage.exists(key),
        lambda: storage.delete(key),
        lambda: storage.url(key, 60),
        lambda: storage.uri(key),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("prefix", ["", "/", "../x/", "a//", "a/../b"])
def test_invalid_prefixes_are_refused(
    bucketless_storage: LocalStorage | S3Storage, prefix: str
) -> None:
    with pytest.raises(ValueError):
        bucketless_storage.delete_prefix(prefix)


@pytest.mark.parametrize("ttl_s", [0, -1, 8 * 24 * 3600])
def test_url_ttl_out_of_range_is_refused(
    bucketless_storage: LocalStorage | S3Storage, ttl_s: int
) -> None:
    with pytest.raises(ValueError):
        bucketless_storage.url("o/j/video.mp4", ttl_s)


# Local backend ----------------------------------------------------------------------------


def test_local_url_shape_and_verify(tmp_path: Path) -> None:
    clock = FakeClock()
    storage = LocalStorage(tmp_path, BASE_URL + "/", SECRET, clock=clock)
    url = storage.url("o/j/video.mp4", ttl_s=600)
    expires = int(clock.now) + 600
    assert url.startswith(f"{BASE_URL}/files/o/j/video.mp4?expires={expires}&signature=")
    key, expires, signature = _signed(url)
    assert len(signature) == 64 and int(signature, 16) >= 0  # hex sha256
    assert storage.verify(key, expires, signature)


def test_local_verify_refuses_tampering_and_expiry(tmp_path: Path) -> None:
    clock = FakeClock()
    storage = LocalStorage(tmp_path, BASE_URL, SECRET, clock=clock)
    key, expires, signature = _signed(storage.url("o/j/video.mp4", ttl_s=60))
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]

    assert not storage.verify(key, expires, flipped)
    assert not storage.verify(key, expires, signature.upper())
    assert not storage.verify(key, expires, "")
    assert not storage.verify(key, expires, "é" * 64)
    assert not storage.verify(key, expires + 3600, signature)  # extended expiry
    assert not storage.verify("o/j/thumbnail.jpg", expires, signature)  # other object
    assert not storage.verify("../etc/passwd", expires, signature)
    other_secret = LocalStorage(tmp_path, BASE_URL, "another-secret", clock=clock)
    assert not other_secret.verify(key, expires, signature)

    clock.now += 60
    assert storage.verify(key, expires, signature)  # valid up to and including `expires`
    clock.now += 1
    assert not storage.verify(key, expires, signature)


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path, BASE_URL, SECRET)
    storage.put("o/j/video.mp4", b"old", "video/mp4")

    def failing_replace(src: str, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("serving.storage.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        storage.put("o/j/video.mp4", b"new", "video/mp4")
    monkeypatch.undo()

    assert storage.get("o/j/video.mp4") == b"old"
    assert list((tmp_path / "tmp").iterdir()) == []  # no temp file left behind
    files = [p.relative_to(tmp_path / "objects") for p in (tmp_path / "objects").rglob("*")]
    assert sorted(map(str, files)) == ["o", "o/j", "o/j/video.mp4"]


def test_local_path_is_under_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, BASE_URL, SECRET)
    storage.put("o/j/video.mp4", b"bytes", "video/mp4")
    path = storage.path("o/j/video.mp4")
    assert path.is_relative_to(tmp_path.resolve())
    assert path.read_bytes() == b"bytes"
    with pytest.raises(ValueError):
        storage.path("../outside")


def test_local_key_cannot_be_object_and_folder(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, BASE_URL, SECRET)
    storage.put("o/j", b"file", "text/plain")
    with pytest.raises(ValueError, match="clashes"):
        storage.put("o/j/video.mp4", b"x", "video/mp4")
    assert storage.get("o/j") == b"file"
    assert not storage.exists("o/j/video.mp4")


def test_local_refuses_empty_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalStorage(tmp_path, BASE_URL, "")


# S3 backend -------------------------------------------------------------------------------


def test_s3_presigned_url_tampered_is_refused_by_server(s3_storage: S3Storage) -> None:
    storage = s3_storage
    storage.put("o/j/video.mp4", b"secret video", "video/mp4")
    url = storage.url("o/j/video.mp4", ttl_s=300)
    assert httpx.get(url, timeout=10).status_code == 200
    other_key = url.replace("/o/j/video.mp4?", "/o/j/other.mp4?")
    assert httpx.get(other_key, timeout=10).status_code == 403
    tampered = url.replace("X-Amz-Expires=300", "X-Amz-Expires=600")
    assert httpx.get(tampered, timeout=10).status_code == 403
    unsigned = url.split("?", 1)[0]
    assert httpx.get(unsigned, timeout=10).status_code == 403


def test_s3_presigned_url_expired_is_refused_by_server(
    s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = s3_storage
    storage.put("o/j/video.mp4", b"v", "video/mp4")
    two_hours_ago = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(hours=2)
    # Sign as if two hours ago, valid for one minute: expired for the server now.
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: two_hours_ago)
    url = storage.url("o/j/video.mp4", ttl_s=60)
    monkeypatch.undo()
    assert httpx.get(url, timeout=10).status_code == 403


def test_s3_wrong_credentials_are_refused(s3_endpoint: S3Endpoint, s3_storage: S3Storage) -> None:
    from botocore.exceptions import ClientError

    bad = S3Storage(
        s3_storage.bucket,
        s3_endpoint.endpoint_url,
        s3_endpoint.region,
        s3_endpoint.access_key_id,
        "wrong-secret",
    )
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        bad.put("o/j/video.mp4", b"x", "video/mp4")
    assert not s3_storage.exists("o/j/video.mp4")


def test_s3_ensure_bucket_creates_once(s3_endpoint: S3Endpoint) -> None:
    storage = unconfigured_s3(s3_endpoint)
    names = {b["Name"] for b in storage.client.list_buckets()["Buckets"]}
    assert storage.bucket not in names
    storage.ensure_bucket()
    try:
        storage.ensure_bucket()  # idempotent
        names = {b["Name"] for b in storage.client.list_buckets()["Buckets"]}
        assert storage.bucket in names
    finally:
        drop_bucket(storage)


def test_s3_delete_prefix_beyond_one_page(s3_storage: S3Storage) -> None:
    storage = s3_storage
    # More than one list/delete page (1000 keys) to exercise pagination.
    for index in range(1005):
        storage.client.put_object(Bucket=storage.bucket, Key=f"o/j/f{index:04d}", Body=b"")
    storage.put("o/keep/video.mp4", b"v", "video/mp4")
    assert storage.delete_prefix("o/j/") == 1005
    assert storage.client.list_objects_v2(Bucket=storage.bucket, Prefix="o/j/")["KeyCount"] == 0
    assert storage.exists("o/keep/video.mp4")


# make_storage -----------------------------------------------------------------------------


def test_make_storage_local(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        storage_backend="local",
        data_dir=tmp_path,
        public_base_url="https://videos.example.test/",
        url_signing_secret="s3cret",  # type: ignore[arg-type]
    )
    storage = make_storage(settings)
    assert isinstance(storage, LocalStorage)
    assert storage.root == (tmp_path / "storage").resolve()
    storage.put("o/j/video.mp4", b"v", "video/mp4")
    assert storage.url("o/j/video.mp4", 60).startswith("https://videos.example.test/files/o/j/")
    assert (tmp_path / "storage" / "objects" / "o" / "j" / "video.mp4").read_bytes() == b"v"


def test_make_storage_s3(s3_endpoint: S3Endpoint) -> None:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        storage_backend="s3",
        s3_bucket=bucket,
        s3_endpoint_url=s3_endpoint.endpoint_url,
        s3_region=s3_endpoint.region,
        s3_access_key_id=s3_endpoint.access_key_id,  # type: ignore[arg-type]
        s3_secret_access_key=s3_endpoint.secret_access_key,  # type: ignore[arg-type]
    )
    storage = make_storage(settings)
    assert isinstance(storage, S3Storage)
    storage.ensure_bucket()
    try:
        storage.put("o/j/video.mp4", b"v", "video/mp4")
        assert storage.uri("o/j/video.mp4") == f"s3://{bucket}/o/j/video.mp4"
        assert httpx.get(storage.url("o/j/video.mp4", 60), timeout=10).content == b"v"
    finally:
        drop_bucket(storage)
