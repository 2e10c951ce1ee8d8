"""The console, driven in Chromium like a person would, against the live api + worker stack.
Every step waits for the state it needs (Playwright's auto-waiting `expect`, or an explicit wait
for a job state) with a generous deadline; screenshots of each step go to test-artifacts/."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import ConsoleMessage, Page, expect

from tests.console.conftest import ConsoleStack
from tests.e2e.test_up import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB_DEADLINE_MS = 180_000  # a job on a 2-core machine shared with other work; generous
STEP_MS = 30_000
ANY_URL = re.compile(r"^https?://")


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


def submit_via_api(stack: ConsoleStack, owner: str, **fields: str) -> str:
    with stack.client(owner) as client:
        answer = client.post("/api/v1/animate-image", files={"image": ("in.png", png_bytes(), "image/png")},
                             data=fields)
    assert answer.status_code in (200, 202), answer.text
    return str(answer.json()["jobId"])


def test_cancel_a_running_job(console: Page, console_stack: ConsoleStack, tmp_path: Path, artifacts: Path) -> None:
    page = console
    sign_in(page, console_stack, "alice")
    choose_image(page, tmp_path)
    set_advanced(page, numInferenceSteps=50, width=256, height=256)  # long enough to catch running
    page.get_by_role("button", name="Animate", exact=True).click()
    job = job_id(page)
    wait_status(page, "processing")
    page.get_by_role("button", name="Cancel").click()
    wait_status(page, "canceled", timeout_ms=STEP_MS)
    expect(page.locator("#cancel")).to_be_disabled()
    expect(page.locator("#job-retry")).to_be_visible()  # a canceled job can be run again
    page.screenshot(path=artifacts / "03-canceled.png", full_page=True)
    assert wait_api(console_stack, "alice", job, lambda s: s["status"] == "canceled")["resultUrl"] is None


def test_reload_mid_job_resumes_its_events(console: Page, console_stack: ConsoleStack, tmp_path: Path,
                                            artifacts: Path) -> None:
    page = console
    sign_in(page, console_stack, "alice")
    choose_image(page, tmp_path)
    set_advanced(page, numInferenceSteps=50, width=256, height=256)
    page.get_by_role("button", name="Animate", exact=True).click()
    job = job_id(page)
    expect(page.locator("#job-steps")).to_contain_text("Step", timeout=JOB_DEADLINE_MS)
    before = float(page.evaluate("document.getElementById('job-progress').value"))
    assert before > 0
    page.reload()
    # The same job, followed again from the last event this tab saw (Last-Event-ID).
    expect(page.locator("#job-id")).to_have_text(job)
    expect(page.locator("#job-connection")).to_have_text("resumed")
    assert float(page.evaluate("document.getElementById('job-progress').value")) >= before
    page.screenshot(path=artifacts / "04-resumed.png", full_page=True)
    wait_status(page, "completed")
    assert video_plays(page) > 0


def test_a_dropped_event_stream_resumes_where_it_stopped(console: Page, console_stack: ConsoleStack,
                                                         tmp_path: Path) -> None:
    page = console
    sign_in(page, console_stack, "alice")
    choose_image(page, tmp_path)
    set_advanced(page, numInferenceSteps=50, width=256, height=256)
    sample_progress(page)
    page.get_by_role("button", name="Animate", exact=True).click()
    job = job_id(page)
    expect(page.locator("#job-steps")).to_contain_text("Step", timeout=JOB_DEADLINE_MS)
    expect(page.locator("#job-connection")).to_have_text("connected")
    console_stack.restart_api()  # the ingress dies: the stream drops, the job runs on in the worker
    # Only a new connection can deliver what follows ("closed": it came with the terminal event).
    expect(page.locator("#job-connection")).to_have_text(re.compile("resumed|closed"), timeout=STEP_MS)
    wait_status(page, "completed")
    seen: list[float] = page.evaluate("window.progressSeen")
    assert seen == sorted(seen) and seen[-1] == 1
    assert api_status(console_stack, "alice", job)["status"] == "completed"
    assert video_plays(page) > 0


def test_history_pages_filters_and_shows_cached_jobs(console: Page, console_stack: ConsoleStack,
                                                     artifacts: Path) -> None:
    stack = console_stack
    first = submit_via_api(stack, "carol", seed="5", numFrames="4")
    wait_api(stack, "carol", first, lambda s: s["status"] == "completed")
    # The same request with a fixed seed completes at once from the first job's outputs.
    cached = [submit_via_api(stack, "carol", seed="5", numFrames="4") for _ in range(11)]
    assert all(api_status(stack, "carol", job)["cached"] for job in cached)
    page = console
    sign_in(page, stack, "carol")
    page.get_by_role("tab", name="History").click()
    items = page.locator("#history li")
    expect(items).to_have_count(10)
    expect(page.locator("#history li .badge", has_text="cached")).to_have_count(10)
    page.get_by_role("button", name="More").click()
    expect(items).to_have_count(12)
    expect(page.get_by_role("button", name="More")).to_be_hidden()
    ids = items.evaluate_all("items => items.map(i => i.dataset.jobId)")
    assert ids[-1] == first and set(ids) == {first, *cached}  # newest first, each job once
    expect(page.locator(f'#history li[data-job-id="{cached[0]}"] img')).to_have_attribute("src", ANY_URL)
    page.screenshot(path=artifacts / "05-history.png", full_page=True)
    page.get_by_label("Status").select_option("error")
    expect(page.locator("#history-empty")).to_be_visible()
    expect(items).to_have_count(0)


def test_retry_a_failed_job_from_the_history(console: Page, console_stack: ConsoleStack, tmp_path: Path,
                                             artifacts: Path) -> None:
    page = console
    sign_in(page, console_stack, "alice")
    choose_image(page, tmp_path)
    page.locator("#advanced summary").click()
    page.get_by_label("Provider").select_option("runway")  # its tasks fail on this stack
    page.get_by_role("button", name="Animate", exact=True).click()
    failed = job_id(page)
    wait_status(page, "error")
    message = api_status(console_stack, "alice", failed)["error"]["message"]
    expect(page.locator("#job-error")).to_contain_text(message)
    page.get_by_role("tab", name="History").click()
    page.get_by_label("Status").select_option("error")
    page.get_by_role("button", name=f"Retry job {failed}").click()
    expect(page.locator("#job-id")).not_to_have_text(failed)
    retried = job_id(page)
    assert api_status(console_stack, "alice", retried)["retryOf"] == failed
    page.screenshot(path=artifacts / "06-retried.png", full_page=True)


def test_a_bad_image_is_refused_with_the_apis_message(console: Page, console_stack: ConsoleStack,
                                                       tmp_path: Path, artifacts: Path) -> None:
    junk = b"this is not an image, whatever its name says"
    with console_stack.client("alice") as client:
        refused = client.post("/api/v1/animate-image", files={"image": ("bad.png", junk, "image/png")})
    assert refused.status_code in (415, 422)
    page = console
    sign_in(page, console_stack, "alice")
    choose_image(page, tmp_path, junk, "bad.png")
    page.get_by_role("button", name="Animate", exact=True).click()
    expect(page.locator("#error")).to_have_text(refused.json()["detail"])
    expect(page.locator("#error")).to_have_attribute("data-code", refused.json()["code"])
    page.screenshot(path=artifacts / "07-refused.png", full_page=True)


def test_the_operator_view_shows_a_dead_letter(console: Page, console_stack: ConsoleStack, artifacts: Path) -> None:
    failed = submit_via_api(console_stack, "bob", provider="runway")
    wait_api(console_stack, "bob", failed, lambda s: s["status"] == "error")
    page = console
    sign_in(page, console_stack, "alice")
    expect(page.get_by_role("tab", name="Operator")).to_be_hidden()  # alice's key lacks `admin`
    sign_in(page, console_stack, "ops")
    page.get_by_role("tab", name="Operator").click()
    expect(page.locator("#overview")).to_contain_text("Queue depth")
    expect(page.locator("#overview")).to_contain_text("Spend this month")
    letter = page.locator(f'#dead-letters li[data-job-id="{failed}"]')
    expect(letter).to_contain_text("bob-")
    page.screenshot(path=artifacts / "08-operator.png", full_page=True)
    letter.get_by_role("button", name=f"Retry job {failed}").click()
    expect(letter).to_contain_text("retried as")
    with console_stack.client("bob") as client:
        mine = client.get("/api/v1/animate-image", params={"limit": 5}).json()["jobs"]
    assert any(job["retryOf"] == failed for job in mine)  # the new job is bob's


def test_a_second_owner_sees_none_of_the_first_owners_jobs(console: Page, console_stack: ConsoleStack) -> None:
    alices = submit_via_api(console_stack, "alice", numFrames="2", numInferenceSteps="1")
    with console_stack.client("alice") as client:
        alice_ids = {job["jobId"] for job in client.get("/api/v1/animate-image", params={"limit": 100}).json()["jobs"]}
    assert alices in alice_ids
    page = console
    sign_in(page, console_stack, "alice")
    page.evaluate(f"sessionStorage.setItem('svd.currentJob', JSON.stringify({{jobId: '{alices}'}}))")
    page.reload()
    expect(page.locator("#job-id")).to_have_text(alices)
    # Bob in the same tab: the key is replaced, alice's job is forgotten.
    page.get_by_label("API key").fill(console_stack.keys["bob"])
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#identity")).to_contain_text("Owner bob-")
    expect(page.locator("#job")).to_be_hidden()
    page.get_by_role("tab", name="History").click()
    expect(page.locator("#history-empty, #history li").first).to_be_visible()
    assert not alice_ids & set(page.locator("#history li").evaluate_all("items => items.map(i => i.dataset.jobId)"))
    # Opening alice's job by id answers bob as if it did not exist.
    page.evaluate(f"sessionStorage.setItem('svd.currentJob', JSON.stringify({{jobId: '{alices}'}}))")
    page.reload()
    expect(page.locator("#error")).to_contain_text("was not found")
    expect(page.locator("#job")).to_be_hidden()


DELIVER_IMAGE = """({how, b64}) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
    if (how === 'drop') {
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    } else {
        document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true}));
    }
}"""


def test_form_details_double_click_code_labels_and_phone_width(console: Page, console_stack: ConsoleStack,
                                                                tmp_path: Path, artifacts: Path) -> None:
    page = console
    sign_in(page, console_stack, "carol")
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id || e.outerHTML)""")
    assert unlabeled == []
    choose_image(page, tmp_path)
    page.get_by_role("button", name="Random").click()
    seed = page.locator("#seed").input_value()
    assert seed.isdigit()
    page.get_by_role("button", name="curl").click()
    code = page.locator("#code").inner_text()
    key = console_stack.keys["carol"]
    assert key not in code and key[:8] + "…" in code and "$SVD_SERVE_API_KEY" in code
    assert f"-F 'seed={seed}'" in code and "-F image=@'photo.png'" in code
    page.get_by_role("button", name="Python").click()
    assert key not in page.locator("#code").inner_text()
    # A value out of range: the estimate says why, in the API's words, before anything is sent.
    page.locator("#numFrames").fill("999")
    expect(page.locator("#estimate")).to_contain_text("`numFrames` must be between 2 and 16")
    page.locator("#numFrames").fill("4")
    expect(page.locator("#estimate")).to_contain_text("Estimated cost")
    # Drop and paste deliver the image like the file picker.
    for how in ("drop", "paste"):
        page.evaluate(DELIVER_IMAGE, {"how": how, "b64": base64.b64encode(png_bytes(size=(80, 48))).decode()})
        expect(page.locator("#preview-caption")).to_contain_text("80×48")
        page.evaluate(DELIVER_IMAGE, {"how": how, "b64": base64.b64encode(png_bytes(size=(96, 64))).decode()})
        expect(page.locator("#preview-caption")).to_contain_text("96×64")
    with console_stack.client("carol") as client:
        before = len(client.get("/api/v1/animate-image", params={"limit": 100}).json()["jobs"])
        page.get_by_role("button", name="Animate", exact=True).dblclick()
        job_id(page)
        after = client.get("/api/v1/animate-image", params={"limit": 100}).json()["jobs"]
    assert len(after) == before + 1  # a double click makes one job
    # Keyboard: the tabs move with the arrow keys.
    page.get_by_role("tab", name="Animate").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="History")).to_be_focused()
    expect(page.get_by_role("tab", name="History")).to_have_attribute("aria-selected", "true")
    page.keyboard.press("ArrowLeft")
    # Phone width: nothing wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    too_wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
        .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
        .map(e => e.id || e.tagName + '.' + e.className)""")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, too_wide
    page.screenshot(path=artifacts / "09-phone.png", full_page=True)


def test_webhook_deliveries_are_listed_and_replayed(console: Page, console_stack: ConsoleStack, tmp_path: Path) -> None:
    receiver = Receiver()
    try:
        page = console
        sign_in(page, console_stack, "alice")
        choose_image(page, tmp_path)
        page.locator("#advanced summary").click()
        page.get_by_label("Webhook URL").fill(receiver.url)
        page.get_by_role("button", name="Animate", exact=True).click()
        wait_status(page, "completed")
        assert receiver.got_one.wait(timeout=JOB_DEADLINE_MS / 1000), "no webhook arrived"
        deliveries = page.locator("#webhooks li")
        # The list is read when the result shows; the delivery may still be pending then.
        expect(deliveries.first).to_contain_text("job.completed")
        page.get_by_role("button", name="Replay").first.click()
        deadline = time.monotonic() + JOB_DEADLINE_MS / 1000
        while len(receiver.bodies) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # waiting for the replayed delivery, bounded by the deadline
        assert len(receiver.bodies) >= 2 and receiver.bodies[-1] == receiver.bodies[0]
        expect(page.locator("#error")).to_be_hidden()
    finally:
        receiver.close()


def test_development_mode_needs_no_key(console: Page, console_stack: ConsoleStack) -> None:
    """An ingress with authentication disabled (development only): the console says so and works."""
    from serving.local_stack import free_port
    from tests.e2e.conftest import stop, wait_for

    port = free_port()
    env = {**console_stack.env, "SVD_SERVE_AUTH_DISABLED": "true", "SVD_SERVE_API_KEYS": "",
           "SVD_SERVE_PORT": str(port)}
    api = subprocess.Popen([sys.executable, "-m", "serving.cli", "api"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, "ingress without auth", [api])
        page = console
        page.goto(f"{base}/console/")
        expect(page.locator("#identity")).to_contain_text("Development mode: authentication is disabled")
        expect(page.get_by_role("tab", name="Operator")).to_be_visible()  # every scope, owner local
        expect(page.locator("#estimate")).to_contain_text("Estimated cost")
    finally:
        stop([api])


def test_submit_by_url_with_a_preview(console: Page, console_stack: ConsoleStack) -> None:
    """An image URL: previewed (the CSP allows images from the storage origin and https), fetched
    by the ingress, animated. The URL is a finished job's thumbnail on the S3 endpoint."""
    source = submit_via_api(console_stack, "carol", numFrames="2", numInferenceSteps="1")
    thumbnail = wait_api(console_stack, "carol", source, lambda s: s["status"] == "completed")["thumbnailUrl"]
    page = console
    sign_in(page, console_stack, "carol")
    page.get_by_label("or URL").fill(thumbnail)
    expect(page.locator("#preview-caption")).to_contain_text("×")
    expect(page.locator("#preview-caption")).not_to_contain_text("no preview")
    page.get_by_role("button", name="curl").click()
    assert '"imageUrl":' in page.locator("#code").inner_text()
    page.get_by_role("button", name="Animate", exact=True).click()
    job = job_id(page)
    wait_status(page, "completed")
    assert api_status(console_stack, "carol", job)["status"] == "completed"


def test_a_waiting_job_shows_its_queue_position_and_expected_start(console: Page, console_stack: ConsoleStack,
                                                                    tmp_path: Path) -> None:
    # One dispatcher slot (the default): a long job in front keeps the next one waiting.
    blocker = submit_via_api(console_stack, "carol", numInferenceSteps="50", width="256", height="256")
    wait_api(console_stack, "carol", blocker, lambda s: s["status"] == "processing")
    page = console
    sign_in(page, console_stack, "alice")
    choose_image(page, tmp_path)
    page.get_by_role("button", name="Animate", exact=True).click()
    job = job_id(page)
    wait_status(page, "queued", timeout_ms=STEP_MS)
    expect(page.locator("#job-queue")).to_have_text("0")  # next in line
    # The expected start, when the queue has measured its drain rate (the API's estimatedStartAt).
    eta = api_status(console_stack, "alice", job)["estimatedStartAt"]
    expect(page.locator("#job-eta")).to_have_text(re.compile(r"^(in \d+ (s|min)|now)$") if eta else "–")
    with console_stack.client("carol") as client:
        client.delete(f"/api/v1/animate-image/{blocker}")
    wait_status(page, "completed")
    expect(page.locator("#job-queue")).to_have_text("–")
