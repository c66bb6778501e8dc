"""The client and ``videoqa ask`` need only the base install: no torch, Flask or PyAV imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Imports are measured in a fresh interpreter.
pytestmark = pytest.mark.service

HEAVY = ("torch", "transformers", "flask", "werkzeug", "av", "numpy", "PIL")


def test_client_and_cli_import_no_worker_or_api_code() -> None:
    probe = (
        "import sys, common.client, worker.cli.main, worker.cli.ask; "
        f"print(','.join(sorted(name for name in {HEAVY!r} if name in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
