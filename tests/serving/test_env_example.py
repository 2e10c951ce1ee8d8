"""`.env.example` is generated from `Settings` and never drifts from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from serving.env_example import env_name
from serving.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / ".env.example"


def generated() -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVD_SERVE_") and k != "REDIS_URL"}
    result = subprocess.run([sys.executable, "-m", "serving.cli", "config", "env-example"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_env_example_is_what_the_command_generates() -> None:
    assert EXAMPLE.read_text() == generated(), (
        ".env.example is stale: run `svd-serve config env-example > .env.example` and commit it"
    )


def test_every_setting_appears_once() -> None:
    text = EXAMPLE.read_text()
    for name, field in Settings.model_fields.items():
        assert text.count(f"# {env_name(name, field)}=") == 1, name


def test_the_listed_defaults_read_back_as_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncommenting every line that has a value changes nothing (empty lines stay unset)."""
    for key in list(os.environ):
        if key.startswith("SVD_SERVE_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        assignment = line.removeprefix("# ").split("  #", 1)[0].strip()
        if "=" in assignment and assignment.split("=", 1)[0].isupper() and assignment.split("=", 1)[1]:
            lines.append(assignment)
    assert len(lines) > 80
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)  # a stray .env of the checkout must not count
    from_file = Settings(_env_file=env_file)  # type: ignore[call-arg]
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    for name in Settings.model_fields:
        got, want = getattr(from_file, name), getattr(defaults, name)
        if isinstance(want, SecretStr):
            got, want = got.get_secret_value(), want.get_secret_value()
        assert got == want, name
