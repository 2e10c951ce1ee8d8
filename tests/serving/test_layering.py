"""What may import what inside `serving/` (issue #14), so an upward import cannot come back.

Each top-level module or package of `serving` sits in one layer; it may import only from lower
layers (never from its own layer's other units, never upward). The ingress and the worker are
two apps on one layer: neither imports the other. Providers sit below both: a provider never
imports the worker (the import that ran up the layers, runway.py -> worker/postprocessing.py).
Only the settings, the two apps and the CLI may import the engine (`pipelines`, `models`);
`pipelines`/`models` never import `serving` (tests/models/test_layering.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVING = ROOT / "serving"

# Lowest first. A new module must be placed here (the test says so).
LAYERS: tuple[frozenset[str], ...] = tuple(frozenset(layer) for layer in (
    {"errors", "types", "provider_names", "keys", "uris"},
    {"settings", "strict_json", "redis_clients", "media", "metrics"},
    {"netguard", "storage", "db", "queue", "env_example"},
    {"events", "security", "cost", "autoscaling", "backpressure"},
    {"observability", "progress", "logs", "backend"},
    {"webhooks", "lifecycle"},
    {"providers", "result_cache"},
    {"ingress", "worker"},
    {"cli_client", "local_stack"},
    {"cli"},
))
RANK = {unit: rank for rank, layer in enumerate(LAYERS) for unit in layer}
ENGINE = {"pipelines", "models"}
MAY_IMPORT_ENGINE = {"settings", "ingress", "worker", "cli"}
IGNORED = {"__init__", "migrations", "assets"}


def unit_of(path: Path) -> str:
    """`serving/providers/fal.py` -> "providers"; `serving/cost.py` -> "cost"."""
    return path.relative_to(SERVING).parts[0].removesuffix(".py")


def imported(source: str) -> set[str]:
    """Absolute module names `source` imports (TYPE_CHECKING and function-level ones included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def violations(unit: str, source: str) -> list[str]:
    """Why `source`, a file of `unit`, breaks the layering; empty when it does not."""
    if unit not in RANK:
        return [f"serving.{unit} is in no layer: place it in LAYERS"]
    found = []
    for name in sorted(imported(source)):
        root, _, rest = name.partition(".")
        if root in ENGINE and unit not in MAY_IMPORT_ENGINE:
            found.append(f"serving.{unit} imports the engine ({name})")
        if root != "serving" or not rest:
            continue
        target = rest.split(".")[0]
        if target == unit or target in IGNORED:
            continue
        if target not in RANK:
            found.append(f"serving.{unit} imports serving.{target}, which is in no layer")
        elif RANK[target] >= RANK[unit]:
            direction = "sideways" if RANK[target] == RANK[unit] else "upwards"
            found.append(f"serving.{unit} imports {name} ({direction})")
    return found


SOURCES = sorted(p for p in SERVING.rglob("*.py") if not IGNORED & set(p.relative_to(SERVING).parts)
                 and p.relative_to(SERVING).parts[0] != "__init__.py")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_serving_imports_only_downwards(path: Path) -> None:
    assert violations(unit_of(path), path.read_text()) == []


@pytest.mark.parametrize(
    ("unit", "source", "expected"),
    [
        # The import issue #14 removed: a provider reaching up into the worker.
        ("providers", "from serving.worker.postprocessing import PostProcessingService",
         ["serving.providers imports serving.worker.postprocessing (upwards)"]),
        ("ingress", "import serving.worker.runner", ["serving.ingress imports serving.worker.runner (sideways)"]),
        ("worker", "from serving.ingress.app import create_app",
         ["serving.worker imports serving.ingress.app (sideways)"]),
        ("cost", "if TYPE_CHECKING:\n    from serving.providers.routed import RoutedBackend",
         ["serving.cost imports serving.providers.routed (upwards)"]),
        ("providers", "def f():\n    from pipelines.errors import NonFiniteOutput",
         ["serving.providers imports the engine (pipelines.errors)"]),
        ("console", "import serving.types", ["serving.console is in no layer: place it in LAYERS"]),
        # Downwards and within a unit are fine.
        ("providers", "from serving.backend import VideoBackend\nfrom serving.providers.router import decide", []),
        ("worker", "from pipelines.errors import NonFiniteOutput\nfrom serving.providers.routed import X", []),
    ],
)
def test_the_check_catches_upward_imports(unit: str, source: str, expected: list[str]) -> None:
    assert violations(unit, source) == expected


def test_every_unit_is_placed_once() -> None:
    units = {unit_of(p) for p in SOURCES}
    assert units <= set(RANK), units - set(RANK)
    assert sum(len(layer) for layer in LAYERS) == len(RANK)
