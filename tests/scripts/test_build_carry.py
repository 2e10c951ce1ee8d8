"""scripts/build_carry.py's check that a torchao wheel matches the GPU image's torch (no download here)."""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_carry.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_carry_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_torch_a_torchao_wheel_is_built_for_is_read_from_the_wheel(tmp_path: Path) -> None:
    carry = _load()
    wheel = tmp_path / "torchao-0.18.0-cp310-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        # The lines torchao 0.18.0's torchao/__init__.py guards its C++ extensions with.
        archive.writestr("torchao/__init__.py", 'current_torch_version = _parse_version(torch.__version__)\n'
                                                '    min_torch_version = _parse_version("2.11.0")\n')
    assert carry._torchao_min_torch(wheel) == "2.11.0"
    assert carry.TORCHAO_FOR_TORCH["2.11"] == "0.18.0"  # the lent H200 image's torch is 2.11


def test_an_unknown_torch_is_refused_before_any_download(tmp_path: Path) -> None:
    carry = _load()
    with pytest.raises(SystemExit, match="No torchao release is known to match torch 2.99.0"):
        carry.main(["--torch", "2.99.0", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())
