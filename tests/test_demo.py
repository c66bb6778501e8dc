"""The README's main command on a bare machine: no Redis at its URL, no model, no storage set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.cli.stack import free_port, redis_answers

# `videoqa demo` runs as a command.
pytestmark = pytest.mark.service


def test_demo_starts_what_it_needs_and_prints_an_answer(tmp_path: Path) -> None:
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIDEOQA_", "AWS_"))}
    env.update({"HOME": str(tmp_path), "VIDEOQA_REDIS_URL": redis_url, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    videoqa = Path(sys.executable).with_name("videoqa")
    completed = subprocess.run(
        [str(videoqa), "demo"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    out = completed.stdout
    assert "starting redis-server" in out
    assert "building the tiny random-weight model" in out
    assert "Question: Are these two cats in these two videos doing the same thing?" in out
    assert "Answer:" in out
    assert "Frames:   v0#0@0.00s, v0#20@0.67s" in out
    for stage in ("download", "decode", "ingest", "generate", "total"):
        assert f"  {stage}" in out
    # Local-directory storage under the user's cache, and the Redis it started is gone again.
    assert any((tmp_path / ".cache" / "videoqa" / "storage").rglob("frames/*/*/*/*.png"))
    assert not redis_answers(redis_url)
