"""The service as an outside backend sees it: ingress and Ray Serve app as separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.local_stack import free_port
from tests.s3_server import running_s3_server


# Extra keys and the webhook secret of the live stack: `bob` is the owner whose rate limit a test
# exhausts (every key has its own bucket); webhooks to loopback receivers are allowed.
E2E_KEYS = {"alice": "e2e-key-alice", "bob": "e2e-key-bob"}
E2E_WEBHOOK_SECRET = "whsec_ZTJlLXdlYmhvb2stc2VjcmV0LWZvci10ZXN0cw=="


@dataclass
class Stack:
    base_url: str
    api_key: str
    env: dict[str, str]
    worker_log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=30)


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: process {proc.args} exited with {proc.returncode}")
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout_s} s")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def e2e_stack(
    pg_database_url: str, tmp_path_factory: pytest.TempPathFactory, unique_session_prefix: str
) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("e2e-data")
    port = free_port()
    with running_s3_server(tmp_path_factory.mktemp("s3")) as s3:
        env = {
            **os.environ,
            "SVD_SERVE_DATA_DIR": str(data_dir),
            "SVD_SERVE_DATABASE_URL": pg_database_url,
            "REDIS_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
            "SVD_SERVE_QUEUE_NAME": unique_session_prefix,
            "SVD_SERVE_KEY_PREFIX": unique_session_prefix,
            "SVD_SERVE_API_KEYS": ",".join(f"{owner}:{key}" for owner, key in E2E_KEYS.items()),
            "SVD_SERVE_WEBHOOK_SECRETS": E2E_WEBHOOK_SECRET,
            "SVD_SERVE_OUTBOUND_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
            "SVD_SERVE_STORAGE_BACKEND": "s3",
            "SVD_SERVE_S3_ENDPOINT_URL": s3.endpoint_url,
            "SVD_SERVE_S3_ACCESS_KEY_ID": s3.access_key_id,
            "SVD_SERVE_S3_SECRET_ACCESS_KEY": s3.secret_access_key,
            "SVD_SERVE_S3_REGION": s3.region,
            "SVD_SERVE_S3_BUCKET": "e2e-videos",
            "SVD_SERVE_RAY_NUM_CPUS": "2",
            "SVD_SERVE_PORT": str(port),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        exe = [sys.executable, "-m", "serving.cli"]
        subprocess.run([*exe, "migrate"], env=env, check=True)
        worker_log = data_dir / "worker.log"
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with worker_log.open("wb") as log:
                procs.append(subprocess.Popen([*exe, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT))
            procs.append(subprocess.Popen([*exe, "api"], env=env))
            base = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                try:
                    return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, 60, "ingress", procs)
            wait_for(lambda: b"svd-serve worker ready" in worker_log.read_bytes(), 240, "worker", procs)
            yield Stack(base_url=base, api_key="e2e-key-alice", env=env, worker_log=worker_log)
        finally:
            stop(procs)
            if any(p.returncode not in (0, -15) for p in procs):
                sys.stderr.write(worker_log.read_text(errors="replace")[-5000:])


@pytest.fixture(scope="session")
def unique_session_prefix() -> str:
    import uuid

    return f"e2e{uuid.uuid4().hex[:8]}"
