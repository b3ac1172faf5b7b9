"""Docs that list things the code defines must list all of them."""

from __future__ import annotations

import re
from pathlib import Path

from tidings import CloseCode, ErrorCode, __version__
from tidings.config import FIELDS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_setting_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for name in FIELDS:
        assert f"| `{name}` | `TIDINGS_{name.upper()}` | `--{name.replace('_', '-')}` |" in text, (
            name
        )


def test_every_error_and_close_code_is_documented() -> None:
    text = (DOCS / "protocol.md").read_text()
    for code in ErrorCode:
        assert f"`{code.value}`" in text, code
    for close in CloseCode:
        assert str(close.value) in text, close


def test_the_readme_links_work_off_github() -> None:
    """PyPI shows README.md without the repository: relative links would break there."""
    readme = (DOCS.parent / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert links
    relative = [link for link in links if not link.startswith(("https://", "http://", "#"))]
    assert not relative, relative


def test_there_is_a_changelog_with_an_entry_for_this_version() -> None:
    changelog = (DOCS.parent / "CHANGELOG.md").read_text()
    assert f"## [{__version__}]" in changelog
