"""The console in a real Chromium (Debian's, launched by Playwright) against a real `svd-serve api`
and `worker` on the tiny model, with S3 storage on loopback (the video comes from another origin,
as in production) and Runway's documented REST contract on loopback, scripted to fail, for jobs
that end in `error`."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from playwright.sync_api import Browser, BrowserType, Playwright, sync_playwright

from serving.local_stack import free_port
from tests.e2e.conftest import stop, wait_for
from tests.fake_runway import FakeRunway, running_fake_runway
from tests.s3_server import running_s3_server

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (.ci/run installs it); Playwright downloads nothing here
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WEBHOOK_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD3CUf1w/Iw6s="  # a test secret, nothing else
# Screenshots of each step, kept as test artifacts (gitignored).
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"


@dataclass
class ConsoleStack:
    base_url: str
    keys: dict[str, str]  # owner -> API key (`ops` has the admin scope)
    env: dict[str, str]  # the processes' environment
    procs: list[subprocess.Popen[bytes]]  # [worker, api]

    def client(self, owner: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.keys[owner]}"},
                            timeout=30)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def restart_api(self) -> None:
        """Kill the ingress (a crashed pod: every open event stream drops at once, nothing is
        delivered after) and start it again on the same port. A graceful stop would keep serving
        open streams until they end."""
        self.procs[1].kill()
        self.procs[1].wait()
        self.procs[1] = subprocess.Popen([sys.executable, "-m", "serving.cli", "api"], env=self.env)
        wait_for(self.ready, 60, "ingress", self.procs)


# Package scope: the stack (with its own local Ray) is stopped before tests/e2e starts its own.
@pytest.fixture(scope="package")
def console_stack(pg_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleStack]:
    data_dir = tmp_path_factory.mktemp("console-data")
    prefix = f"con{uuid.uuid4().hex[:8]}"
    port = free_port()
    # Every Runway task fails: a job sent there ends in `error` (a dead letter), as a failed
    # task does in production.
    runway = FakeRunway(script=("PENDING", "FAILED"))
    with running_s3_server(tmp_path_factory.mktemp("console-s3")) as s3, running_fake_runway(runway):
        keys = {owner: f"console-key-{owner}-{prefix}" for owner in ("alice", "bob", "carol")}
        env = {
            **os.environ,
            "SVD_SERVE_DATA_DIR": str(data_dir),
            "SVD_SERVE_DATABASE_URL": pg_database_url,
            "REDIS_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
            "SVD_SERVE_QUEUE_NAME": prefix,
            "SVD_SERVE_KEY_PREFIX": prefix,
            "SVD_SERVE_API_KEYS": ",".join(f"{owner}-{prefix}:{key}" for owner, key in keys.items()),
            "SVD_SERVE_STORAGE_BACKEND": "s3",
            "SVD_SERVE_S3_ENDPOINT_URL": s3.endpoint_url,
            "SVD_SERVE_S3_ACCESS_KEY_ID": s3.access_key_id,
            "SVD_SERVE_S3_SECRET_ACCESS_KEY": s3.secret_access_key,
            "SVD_SERVE_S3_REGION": s3.region,
            "SVD_SERVE_S3_BUCKET": "console-videos",
            "SVD_SERVE_RUNWAY_API_KEY": runway.api_key,
            "SVD_SERVE_RUNWAY_BASE_URL": runway.base_url,
            "SVD_SERVE_RUNWAY_POLL_INTERVAL_S": "0.2",
            "SVD_SERVE_RUNWAY_POLL_MAX_INTERVAL_S": "0.5",
            "SVD_SERVE_RAY_NUM_CPUS": "2",
            "SVD_SERVE_PORT": str(port),
            # Webhooks to a receiver on loopback (signed, polled often).
            "SVD_SERVE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "SVD_SERVE_ALLOW_PRIVATE_URLS": "true",
            "SVD_SERVE_WEBHOOK_POLL_INTERVAL_S": "0.1",
            "SVD_SERVE_RATE_LIMIT_PER_S": "0",  # a browser page makes many calls; limits are tested elsewhere
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        exe = [sys.executable, "-m", "serving.cli"]
        subprocess.run([*exe, "migrate"], env=env, check=True)
        created = subprocess.run([*exe, "keys", "create", "--owner", f"ops-{prefix}", "--scopes", "admin"],
                                 env=env, check=True, capture_output=True, text=True)
        keys["ops"] = created.stdout.splitlines()[0].strip()
        worker_log = data_dir / "worker.log"
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with worker_log.open("wb") as log:
                procs.append(subprocess.Popen([*exe, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT))
            procs.append(subprocess.Popen([*exe, "api"], env=env))
            stack = ConsoleStack(base_url=f"http://127.0.0.1:{port}", keys=keys, env=env, procs=procs)
            wait_for(stack.ready, 60, "ingress", procs)
            wait_for(lambda: b"svd-serve worker ready" in worker_log.read_bytes(), 240, "worker", procs)
            yield stack
        finally:
            stop(procs)
            if any(p.returncode not in (0, -15) for p in procs):
                sys.stderr.write(worker_log.read_text(errors="replace")[-5000:])


# pytest-playwright's sync API keeps an event loop running in this thread from its `playwright`
# fixture's start to its stop. Its fixtures are session-scoped, so every asyncio test collected
# after tests/console would find "a running event loop" and fail: these overrides give Playwright
# and the browser the package's lifetime instead, stopped before the next package starts.
@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="package")
def browser_type(playwright: Playwright, browser_name: str) -> BrowserType:
    return cast(BrowserType, getattr(playwright, browser_name))


@pytest.fixture(scope="package")
def launch_browser(browser_type_launch_args: dict[str, Any], browser_type: BrowserType) -> Callable[..., Browser]:
    def launch(**kwargs: Any) -> Browser:
        return browser_type.launch(**{**browser_type_launch_args, **kwargs})

    return launch


@pytest.fixture(scope="package")
def browser_context_args(playwright: Playwright, device: str | None) -> dict[str, Any]:
    """pytest-playwright's (it reads `playwright`), without base URL or video: not used here."""
    return dict(playwright.devices[device]) if device else {}


@pytest.fixture(scope="package")
def browser(launch_browser: Callable[..., Browser]) -> Iterator[Browser]:
    launched = launch_browser()
    yield launched
    launched.close()


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """pytest-playwright's launch arguments, pointed at the system chromium."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does)")
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM), "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def base_url() -> None:
    """Replaces pytest-base-url's fixture (an instance-method fixture that pytest 9 warns about);
    the tests use absolute URLs."""
    return None
