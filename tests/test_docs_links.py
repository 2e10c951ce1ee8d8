"""Every relative link in the README and docs/ points at a file of the repository, so a page
moved or renamed cannot leave a reader at a dead end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "k8s" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert missing == [], f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_the_check_sees_links_and_skips_urls(tmp_path: Path) -> None:
    readme = relative_links(ROOT / "README.md")
    assert "docs/api.md" in readme and "docs/console.md" in readme  # the pattern finds real links
    page = tmp_path / "page.md"
    page.write_text("[a](gone.md#part) [b](https://example.com/x.md) [c](mailto:x@example.com)")
    assert relative_links(page) == ["gone.md"]
