"""examples/node, the Express backend example, run by Node itself against the live stack: it
submits through its own route, follows the relayed Server-Sent Events, and verifies the
service's signed webhook with the `standardwebhooks` npm package (and refuses a forged one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import E2E_WEBHOOK_SECRET, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
SAMPLE = Path(__file__).resolve().parents[2] / "serving" / "assets" / "sample.png"


def node_tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "node and npm are needed (.ci/run installs them)"
    if not (EXAMPLE / "node_modules").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, check=True, timeout=600)
    return node, npm


def test_the_node_example_round_trip(e2e_stack: Stack) -> None:
    node, _ = node_tools()
    env = {**os.environ, "SVD_SERVE_URL": e2e_stack.base_url, "SVD_SERVE_API_KEY": e2e_stack.api_key,
           "SVD_SERVE_WEBHOOK_SECRET": E2E_WEBHOOK_SECRET}
    result = subprocess.run([node, "demo.mjs", str(SAMPLE)], cwd=EXAMPLE, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed"
    assert summary["events"][-1] == "completed" and "progress" in summary["events"]
    assert summary["webhook"]["type"] == "job.completed" and summary["webhook"]["jobId"] == summary["jobId"]
    assert summary["webhook"]["id"]
    assert summary["forgedStatus"] == 400
    assert summary["notFound"] == {"status": 404, "code": "not_found"}
