"""The console, driven in Chromium like a person would, against the live api + worker stack.
Every step waits for the state it needs (Playwright's auto-waiting `expect`, or an explicit wait
for a job state) with a generous deadline; screenshots of each step go to test-artifacts/."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import ConsoleMessage, Page, expect

from tests.console.conftest import ConsoleStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB_DEADLINE_MS = 180_000  # a job on a 2-core machine shared with other work; generous
STEP_MS = 30_000


def png_bytes(color: tuple[int, int, int] = (40, 120, 200), size: tuple[int, int] = (96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def console(page: Page, console_stack: ConsoleStack) -> Iterator[Page]:
    """The page, with every console error and CSP refusal recorded; none may happen."""
    problems: list[str] = []

    def record(message: ConsoleMessage) -> None:
        if message.type == "error" and "404" not in message.text:
            problems.append(message.text)

    page.on("console", record)
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.set_default_timeout(STEP_MS)
    yield page
    assert not [p for p in problems if "Content Security Policy" in p or "uncaught" in p], problems


def sign_in(page: Page, stack: ConsoleStack, owner: str) -> None:
    page.goto(f"{stack.base_url}/console/")
    page.get_by_label("API key").fill(stack.keys[owner])
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#identity")).to_contain_text("Owner ")
    expect(page.locator("#model option").first).to_be_attached()


def choose_image(page: Page, tmp_path: Path, data: bytes | None = None, name: str = "photo.png") -> None:
    path = tmp_path / name
    path.write_bytes(data if data is not None else png_bytes())
    page.locator("#image-file").set_input_files(path)


def set_advanced(page: Page, **fields: Any) -> None:
    details = page.locator("#advanced")
    if details.get_attribute("open") is None:
        page.locator("#advanced summary").click()
    for name, value in fields.items():
        page.locator(f"#{name}").fill(str(value))


def job_id(page: Page) -> str:
    expect(page.locator("#job-id")).not_to_be_empty()
    return page.locator("#job-id").inner_text()


def wait_status(page: Page, status: str, timeout_ms: int = JOB_DEADLINE_MS) -> None:
    expect(page.locator("#job")).to_have_attribute("data-status", status, timeout=timeout_ms)


def api_status(stack: ConsoleStack, owner: str, job: str) -> dict[str, Any]:
    with stack.client(owner) as client:
        return client.get(f"/api/v1/animate-image/status/{job}").json()  # type: ignore[no-any-return]


def wait_api(stack: ConsoleStack, owner: str, job: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_DEADLINE_MS / 1000
    while time.monotonic() < deadline:
        status = api_status(stack, owner, job)
        if done(status):
            return status
        time.sleep(0.2)  # polling the API, bounded by the deadline
    raise AssertionError(f"job {job} never reached the wanted state: {status}")


def sample_progress(page: Page) -> None:
    """Record the progress bar's value in the page every 10 ms (a value change is no DOM mutation)."""
    page.evaluate("""() => {
        window.progressSeen = [];
        setInterval(() => window.progressSeen.push(document.getElementById('job-progress').value), 10);
    }""")


VIDEO_STATE = """() => { const v = document.getElementById('video');
    return {src: v.currentSrc, readyState: v.readyState, networkState: v.networkState, duration: v.duration,
            currentTime: v.currentTime, paused: v.paused, error: v.error && v.error.message}; }"""


def video_plays(page: Page) -> float:
    """Wait until the video element has decoded and is playing; its duration (seconds)."""
    try:
        page.wait_for_function("() => { const v = document.getElementById('video');"
                               " return v.readyState >= 2 && v.duration > 0 && v.currentTime > 0; }",
                               timeout=STEP_MS)
    except Exception as exc:
        raise AssertionError(f"the video does not play: {page.evaluate(VIDEO_STATE)}") from exc
    return float(page.evaluate("document.getElementById('video').duration"))


def test_submit_by_upload_see_progress_and_play(console: Page, console_stack: ConsoleStack, tmp_path: Path,
                                                 artifacts: Path) -> None:
    page = console
    sign_in(page, console_stack, "alice")
    expect(page.locator("#banner")).to_contain_text("random weights")
    choose_image(page, tmp_path)
    expect(page.locator("#preview-caption")).to_contain_text("96×64")
    set_advanced(page, numInferenceSteps=40)
    expect(page.locator("#estimate")).to_contain_text("Estimated cost: $")
    page.screenshot(path=artifacts / "01-form.png", full_page=True)
    sample_progress(page)
    page.get_by_role("button", name="Animate", exact=True).click()
    job = job_id(page)
    wait_status(page, "completed")
    seen: list[float] = page.evaluate("window.progressSeen")
    rising = sorted({v for v in seen if 0 < v < 1})
    assert len(rising) >= 2, f"progress never rose in steps: {sorted(set(seen))}"
    assert seen == sorted(seen) and seen[-1] == 1, "progress went backwards or did not finish"
    # The video element plays the result (H.264 MP4 from the S3 endpoint, another origin).
    assert video_plays(page) > 0
    status = api_status(console_stack, "alice", job)
    expect(page.locator("#downloads")).to_contain_text(f"SHA-256 {status['checksums']['mp4']}")
    expect(page.locator("#result-seed")).to_have_text(str(status["params"]["seed"]))
    expect(page.locator("#webhooks")).to_contain_text("No webhook")
    page.screenshot(path=artifacts / "02-completed.png", full_page=True)
    # "Again with this seed" fills the form with the seed used.
    page.get_by_role("button", name="Again with this seed").click()
    expect(page.locator("#seed")).to_have_value(str(status["params"]["seed"]))
