"""The house rules that tools can check: ruff and mypy --strict stay clean on src/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=300
    )


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.prefix) / "bin/ruff").exists(),
    reason="ruff is not installed",
)
def test_ruff_is_clean_on_src() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.prefix) / "bin/ruff")
    result = run(ruff, "check", "src")
    assert result.returncode == 0, result.stdout + result.stderr
    formatted = run(ruff, "format", "--check", "src")
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.prefix) / "bin/ruff").exists(),
    reason="ruff is not installed",
)
def test_ruff_lint_is_clean_on_tests_examples_and_bench() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.prefix) / "bin/ruff")
    result = run(ruff, "check", "tests", "examples", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean_on_src() -> None:
    pytest.importorskip("mypy")
    result = run(sys.executable, "-m", "mypy")  # files and strictness from pyproject.toml
    assert result.returncode == 0, result.stdout + result.stderr
