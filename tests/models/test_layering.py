"""`models` and `pipelines` stay free of the service: they must run on a bare GPU node."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"fastapi", "ray", "redis", "boto3", "sqlalchemy", "serving"}
SOURCES = sorted((ROOT / "models").rglob("*.py")) + sorted((ROOT / "pipelines").rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_service_imports(path: Path) -> None:
    assert not _imported_roots(path) & FORBIDDEN


def test_models_never_import_pipelines() -> None:
    assert not any("pipelines" in _imported_roots(p) for p in (ROOT / "models").rglob("*.py"))


def test_light_modules_do_not_import_torch() -> None:
    # The ingress validates requests with the registry and params without paying for torch.
    code = (
        "import sys\n"
        "import models, pipelines, pipelines.params, pipelines.errors\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
