"""`svd-serve submit|status|watch|list|cancel|retry|download` against the live stack: each
command's exit code and stdout (data only; progress and errors on stderr, one line each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLE = Path(__file__).resolve().parents[2] / "serving" / "assets" / "sample.png"
SMALL = ["--num-frames", "4", "--steps", "2", "--width", "128", "--height", "64"]


def cli(stack: Stack, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, key and URL from the environment."""
    env = {**os.environ, "SVD_SERVE_URL": stack.base_url, "SVD_SERVE_API_KEY": key or stack.api_key}
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess[str], code: str) -> None:
    assert result.stdout == "", result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and code in lines[0], result.stderr


def test_submit_watch_status_list_download(e2e_stack: Stack, tmp_path: Path) -> None:
    submitted = cli(e2e_stack, "submit", str(SAMPLE), "--seed", "21", "--no-cache", *SMALL)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert submitted.stdout == job_id + "\n" and len(job_id) >= 16

    watched = cli(e2e_stack, "watch", job_id)
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout == job_id + "\n" and "100% completed" in watched.stderr

    events = cli(e2e_stack, "watch", job_id, "--json")
    assert events.returncode == 0, events.stderr
    lines = [json.loads(line) for line in events.stdout.splitlines()]
    assert lines[-1]["event"] == "completed" and all({"id", "event", "data"} <= set(e) for e in lines)

    status = cli(e2e_stack, "status", job_id)
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id}  completed")
    assert "mp4: http" in status.stdout
    as_json = json.loads(cli(e2e_stack, "status", job_id, "--json").stdout)
    assert as_json["jobId"] == job_id and as_json["status"] == "completed"

    listed = cli(e2e_stack, "list", "--limit", "50")
    assert listed.returncode == 0 and any(line.startswith(job_id) for line in listed.stdout.splitlines())
    page = json.loads(cli(e2e_stack, "list", "--json", "--status", "completed", "--limit", "50").stdout)
    assert job_id in [j["jobId"] for j in page["jobs"]] and "nextCursor" in page

    downloaded = cli(e2e_stack, "download", job_id, "--out", str(tmp_path))
    assert downloaded.returncode == 0, downloaded.stderr
    assert downloaded.stdout == f"{tmp_path / job_id}.mp4\n" and (tmp_path / f"{job_id}.mp4").stat().st_size > 0

    # Cancelling an ended job is refused: exit 4, the problem code on one stderr line.
    refused = cli(e2e_stack, "cancel", job_id)
    assert refused.returncode == 4
    one_line_error(refused, "(409)")


def test_submit_wait_json_is_one_document(e2e_stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "v.mp4"
    result = cli(e2e_stack, "submit", str(SAMPLE), "--seed", "22", *SMALL, "--out", str(out), "--json",
                 "--priority", "high")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)  # the whole stdout parses: no progress mixed in
    assert body["status"] == "completed" and body["downloaded"] == {"mp4": str(out), "thumbnail": str(out.with_suffix(".jpg"))}
    assert f"submitted: job {body['jobId']}" in result.stderr


def test_cancel_retry_and_a_failed_job(e2e_stack: Stack) -> None:
    slow = cli(e2e_stack, "submit", str(SAMPLE), "--num-frames", "16", "--steps", "50", "--width", "256",
               "--height", "256").stdout.strip()
    queued = cli(e2e_stack, "submit", str(SAMPLE), "--priority", "low", *SMALL).stdout.strip()
    canceled = cli(e2e_stack, "cancel", queued)
    assert canceled.returncode == 0 and canceled.stdout == f"{queued} canceled\n"
    assert cli(e2e_stack, "cancel", slow, "--json").returncode == 0

    # Watching a job that ended canceled: exit 1 (job failed).
    failed = cli(e2e_stack, "watch", queued, "--quiet")
    assert failed.returncode == 1 and failed.stdout == ""
    assert f"job {queued} ended canceled" in failed.stderr

    retried = cli(e2e_stack, "retry", queued)
    assert retried.returncode == 0, retried.stderr
    new_id = retried.stdout.strip()
    assert new_id != queued
    done = cli(e2e_stack, "watch", new_id, "--json")
    assert done.returncode == 0 and json.loads(done.stdout.splitlines()[-1])["event"] == "completed"
    assert json.loads(cli(e2e_stack, "status", new_id, "--json").stdout)["retryOf"] == queued


def test_errors_are_one_line_with_distinct_exit_codes(e2e_stack: Stack) -> None:
    missing = cli(e2e_stack, "status", "0" * 32)
    assert missing.returncode == 3
    one_line_error(missing, "not_found (404)")

    bad_key = cli(e2e_stack, "list", key="wrong-key")
    assert bad_key.returncode == 4
    one_line_error(bad_key, "invalid_api_key (401)")

    invalid = cli(e2e_stack, "submit", str(SAMPLE), "--model", "no-such-model")
    assert invalid.returncode == 4
    one_line_error(invalid, "unknown_model (422)")
