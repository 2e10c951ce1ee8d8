"""Build the carry set for a GPU lease: the wheels a GPU image without network lacks.

    python scripts/build_carry.py                   # .carry/ for the lent H200 image (torch 2.11, Python 3.12)
    python scripts/build_carry.py --torch 2.11.0 --python 3.12 --out .carry

The lent machine's image has torch, transformers, accelerate, matplotlib and pytest, but no
diffusers, torchao, sageattention or pytest-asyncio, and reaches no package index. This downloads,
for its Python and platform and without dependencies (the image has them):

- diffusers, the version installed here (the one the tests pass with);
- torchao, the release built against the image's torch (its C++ extensions load only on a
  matching torch; checked in the wheel itself, see `_torchao_min_torch`);
- sageattention, the version pinned in pyproject's `gpu` extra;
- svd-serve itself, as a wheel (for a machine without this checkout).

and prints the offline install line. The set stays well under the lease's 64 MiB.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 1024**2
# torchao releases by the torch they are built against (torchao/__init__.py of each release says so).
TORCHAO_FOR_TORCH = {"2.11": "0.18.0"}
SAGEATTENTION = "1.0.6"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
           "--target /tmp/site {out}/*.whl && export PYTHONPATH=$PWD:/tmp/site")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="build_carry", description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", default="2.11.0", help="the GPU image's torch version (default: the lent H200's)")
    parser.add_argument("--python", default="3.12", help="the GPU image's Python (default: the lent H200's)")
    parser.add_argument("--out", type=Path, default=ROOT / ".carry", help="where the wheels go (git-ignored)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    minor = ".".join(args.torch.split(".")[:2])
    torchao = TORCHAO_FOR_TORCH.get(minor)
    if torchao is None:
        known = ", ".join(f"torch {t} -> torchao {a}" for t, a in TORCHAO_FOR_TORCH.items())
        raise SystemExit(f"No torchao release is known to match torch {args.torch} ({known}); add it to "
                         "TORCHAO_FOR_TORCH after reading that release's torchao/__init__.py")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()  # one version of each: two would stop the offline install
    for requirement in (f"diffusers=={version('diffusers')}", f"torchao=={torchao}", f"sageattention=={SAGEATTENTION}"):
        _download(requirement, args.python, out)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True)
    [torchao_wheel] = out.glob("torchao-*.whl")
    needs = _torchao_min_torch(torchao_wheel)
    if needs is not None and ".".join(needs.split(".")[:2]) != minor:
        raise SystemExit(f"{torchao_wheel.name} is built for torch >= {needs}, not {args.torch}")
    total = sum(path.stat().st_size for path in out.glob("*.whl"))
    for path in sorted(out.glob("*.whl")):
        print(f"{path.stat().st_size / 1024**2:7.2f} MiB  {path.name}")
    print(f"{total / 1024**2:7.2f} MiB  in all (the lease carries at most {LIMIT_BYTES // 1024**2} MiB)")
    if total > LIMIT_BYTES:
        raise SystemExit("The carry set is over the lease's limit.")
    print("Offline install on the GPU machine, from the checkout's root:")
    print("  " + INSTALL.format(out=out.relative_to(ROOT) if out.is_relative_to(ROOT) else out))
    return 0


def _download(requirement: str, python: str, out: Path) -> None:
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", *platforms, "-d", str(out), requirement],
                   check=True)


def _torchao_min_torch(wheel: Path) -> str | None:
    """The torch version a torchao wheel's C++ extensions were built for, as its __init__ states it."""
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("torchao/__init__.py").decode()
    match = re.search(r'min_torch_version = _parse_version\("([^"]+)"\)', source)
    return match.group(1) if match else None


if __name__ == "__main__":
    sys.exit(main())
