"""The Python client installs on its own: a fresh virtual environment gets httpx and httpx-sse,
never the server's torch, Ray, diffusers or FastAPI."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.client_venv import client_venv

SERVER_ONLY = {"torch", "ray", "diffusers", "transformers", "fastapi", "numpy", "svd-serve"}


def test_the_client_installs_without_the_server_stack(tmp_path: Path) -> None:
    python = client_venv(tmp_path)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "freeze"], check=True,
                            capture_output=True, text=True).stdout
    installed = {line.split("==")[0].lower().replace("_", "-") for line in listed.splitlines()}
    assert {"svd-serve-client", "httpx", "httpx-sse"} <= installed
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY

    probe = ("import importlib.util, svd_serve_client as c; "
             "assert importlib.util.find_spec('torch') is None and importlib.util.find_spec('serving') is None; "
             "print(c.Client.__name__, c.AsyncClient.__name__, c.__version__)")
    result = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Client AsyncClient 0.1.0\n"
