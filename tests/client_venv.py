"""A fresh virtual environment with only the Python client installed, from a wheel built from the
checkout: what a backend gets from `pip install ./clients/python`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[1] / "clients" / "python"


def client_venv(tmp_path: Path, interpreter: str = sys.executable) -> Path:
    """Builds the client's wheel, installs it into a new venv of `interpreter`; its python."""
    wheels = tmp_path / "wheels"
    # The client's wheel, built from the checkout (setuptools is already in this environment).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(CLIENT)], check=True, timeout=300)
    (wheel,) = wheels.glob("svd_serve_client-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=600)
    return python
