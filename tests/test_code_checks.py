"""The code passes its linter, its formatter's check and the type checker, as configured in
pyproject.toml ([tool.ruff], [tool.mypy]); `make lint` runs the same three."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The entry points of the environment running the tests, on this checkout (not an installed copy).
BIN = Path(sys.executable).parent


def _run(*argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_ruff_finds_nothing() -> None:
    done = _run("ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_code_is_formatted() -> None:
    done = _run("ruff", "format", "--check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


# A first run reads the types of torch, transformers and numpy (a minute or more on a busy
# machine); later runs take seconds from .mypy_cache.
@pytest.mark.timeout(900)
def test_mypy_finds_nothing() -> None:
    done = _run("mypy", timeout_s=840)
    assert done.returncode == 0, done.stdout + done.stderr
