"""Settings, the CLI's quick commands, and start-up refusal on an unmigrated database."""

from __future__ import annotations

import json

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.db.errors import DatabaseNotMigrated
from serving.ingress.app import create_app
from serving.settings import Settings, load_settings


def test_production_refuses_placeholder_secrets() -> None:
    with pytest.raises(ValidationError, match="URL_SIGNING_SECRET"):
        Settings(environment="production", api_keys="a:b")  # type: ignore[arg-type]
    # Keys may live in the database only: the ingress checks at start-up (test_api_keys.py).
    Settings(environment="production", url_signing_secret="s3cret-value")  # type: ignore[arg-type]
    ok = Settings(environment="production", url_signing_secret="s3cret-value", api_keys="a:b")  # type: ignore[arg-type]
    assert ok.api_key_owners() == {"b": "a"}


def test_secrets_directory_and_secret_values_stay_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "svd_serve_api_keys").write_text("backend:k-123")
    monkeypatch.setenv("SVD_SERVE_SECRETS_DIR", str(secrets))
    settings = load_settings()
    assert settings.api_key_owners() == {"k-123": "backend"}
    assert "k-123" not in repr(settings)


def test_malformed_api_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="owner:key"):
        Settings(api_keys="just-a-key").api_key_owners()  # type: ignore[arg-type]


async def test_ingress_refuses_an_unmigrated_database(tmp_path: Path, redis_url: str) -> None:
    settings = Settings(data_dir=tmp_path, redis_url=redis_url)
    app = create_app(settings)
    with pytest.raises(DatabaseNotMigrated, match="svd-serve migrate"):
        async with app.router.lifespan_context(app):
            pass


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_models_list_and_migrate(tmp_path: Path) -> None:
    listing = run_cli("models", "list", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "svd-xt" in listing.stdout and "tiny-random" in listing.stdout and "random weights" in listing.stdout
    as_json = run_cli("models", "list", "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    specs = {spec["name"]: spec for spec in json.loads(as_json.stdout)}
    assert specs["tiny-random"]["is_random"] is True and specs["svd-xt"]["default_num_frames"] == 25

    migrated = run_cli("migrate", cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert (tmp_path / ".svd-serve" / "svd-serve.db").is_file()


def test_cli_without_a_command_explains_usage(tmp_path: Path) -> None:
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2 and "usage: svd-serve" in result.stderr


def test_models_download_pins_the_revision_and_fetches_only_what_loading_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The hub is out of reach here: record the call instead (its patterns are checked against a
    # real saved layout in tests/models/test_download.py).
    import huggingface_hub

    import serving.cli
    from models.download import download_patterns
    from serving.cli import main

    calls: list[tuple[str, dict[str, object]]] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append((repo_id, kw)))
    monkeypatch.setenv("SVD_SERVE_MODELS_DIR", str(tmp_path))
    # In-process: keep the CLI from pointing the process's logging at pytest's captured stdout.
    monkeypatch.setattr(serving.cli, "_settings", lambda args: load_settings())
    assert main(["models", "download", "svd-xt", "--revision", "0123abcd", "--variant", "full"]) == 0
    allow, ignore = download_patterns(None)
    assert calls == [("stabilityai/stable-video-diffusion-img2vid-xt", {
        "revision": "0123abcd", "local_dir": tmp_path / "svd-xt", "allow_patterns": allow, "ignore_patterns": ignore,
    })]
    assert "stable-video-diffusion-img2vid-xt@0123abcd (full)" in capsys.readouterr().out
    monkeypatch.setenv("SVD_SERVE_MODEL_REVISION", "feedbeef")  # the pin a cluster's ConfigMap sets
    assert main(["models", "download", "svd-xt"]) == 0
    assert calls[-1][1]["revision"] == "feedbeef" and calls[-1][1]["allow_patterns"] == download_patterns("fp16")[0]
    with pytest.raises(SystemExit):
        main(["models", "download", "svd-xt", "--variant", "fp8"])
