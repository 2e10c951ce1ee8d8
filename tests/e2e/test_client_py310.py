"""The Python client declares Python 3.10 (a backend's interpreter may be older than the
server's 3.11): installed from its wheel into a Python 3.10 venv, it submits, follows the events,
downloads with its checksum verified and reads a typed error against the live stack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.client_venv import client_venv
from tests.e2e.conftest import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLE = Path(__file__).resolve().parents[2] / "serving" / "assets" / "sample.png"
SCRIPT = """
import hashlib, json, sys
from svd_serve_client import Client, NotFoundError
events = []
with Client() as client:
    info = client.run(sys.argv[1], seed=7, cache=False, num_frames=4, num_inference_steps=2,
                      width=128, height=64, on_event=lambda e: events.append(e.type), timeout=300)
    video = client.download(info, sys.argv[2])
    try:
        client.status("00000000-0000-4000-8000-000000000000")
        missing = None
    except NotFoundError as exc:
        missing = exc.code
print(json.dumps({"python": sys.version_info[:2], "status": info.status, "events": events,
                  "verified": hashlib.sha256(open(video, "rb").read()).hexdigest() == info.checksums["mp4"],
                  "missing": missing}))
"""


def python_3_10() -> str | None:
    """A working Python 3.10: on the PATH, or a pyenv version (whose shim answers only when 3.10
    is a selected version)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [shutil.which("python3.10"), *map(str, sorted(root.glob("versions/3.10*/bin/python3.10")))]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 10)":
            return candidate
    return None


def test_the_client_runs_on_python_3_10(e2e_stack: Stack, tmp_path: Path) -> None:
    interpreter = python_3_10()
    if interpreter is None:  # the client's oldest declared Python; pyenv provides it on CI machines
        pytest.skip("no Python 3.10 on this machine")
    python = client_venv(tmp_path, interpreter)
    env = {**e2e_stack.env, "SVD_SERVE_URL": e2e_stack.base_url, "SVD_SERVE_API_KEY": e2e_stack.api_key}
    result = subprocess.run([str(python), "-c", SCRIPT, str(SAMPLE), str(tmp_path / "out.mp4")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["python"] == [3, 10]
    assert seen["status"] == "completed" and seen["events"][-1] == "completed" and "progress" in seen["events"]
    assert seen["verified"] is True and seen["missing"] == "not_found"
