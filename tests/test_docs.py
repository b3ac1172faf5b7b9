"""Docs that list things the code defines must list all of them."""

from __future__ import annotations

from pathlib import Path

from tidings import CloseCode, ErrorCode
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
