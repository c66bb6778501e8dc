"""``videoqa ask`` as a user runs it: a real subprocess against the running service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.client import Client
from tests.conftest import RunningService

# `videoqa ask` runs as a command.
pytestmark = pytest.mark.service

VIDEOQA = str(Path(sys.executable).with_name("videoqa"))
QUESTION = "What is the cat doing?"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDEOQA_")}
    return {**env, **extra}


def _ask(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VIDEOQA, "ask", *args], env=_env(**env), capture_output=True, text=True, timeout=300)


def test_answer_and_frames(service: RunningService, sample_videos: list[Path]) -> None:
    done = _ask(
        str(sample_videos[0]), str(sample_videos[1]), "-q", QUESTION, "--frames", "2", "--max-new-tokens", "3",
        VIDEOQA_SERVER=service.base_url,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Answer: ")
    assert lines[1:] == [
        "Frames:",
        "  video 0, frame 0 at 0.00 s",
        "  video 0, frame 60 at 2.00 s",
        "  video 1, frame 0 at 0.00 s",
        "  video 1, frame 60 at 2.00 s",
    ]
    job_id = done.stderr.split()[1].rstrip(":")
    assert lines[0] == f"Answer: {Client(service.base_url).get(job_id).raw['result']['answer']}"
    # Stage progress on stderr, one line per stage seen (not a terminal: no spinner), until the
    # answer streams on stdout.
    assert f"job {job_id}: queued" in done.stderr and f"job {job_id}: generating" in done.stderr


def test_failed_job_exits_1_with_its_code(service: RunningService, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 500)
    done = _ask(str(corrupt), "-q", QUESTION, "--server", service.base_url, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "failed" and record["error"]["code"] == "invalid_media"
    assert f"job {record['id']} failed: invalid_media: " in done.stderr


def test_usage_errors_exit_2(service: RunningService, sample_videos: list[Path], tmp_path: Path) -> None:
    video = str(sample_videos[0])
    assert _ask(video, VIDEOQA_SERVER=service.base_url).returncode == 2  # no question
    assert _ask("-q", QUESTION, VIDEOQA_SERVER=service.base_url).returncode == 2  # no video
    missing = _ask(str(tmp_path / "nope.mp4"), "-q", QUESTION, VIDEOQA_SERVER=service.base_url)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    # The service's own refusal of the request as written.
    refused = _ask(video, "-q", QUESTION, "--frames", "1000", VIDEOQA_SERVER=service.base_url)
    assert refused.returncode == 2 and "num_frames: at most 32" in refused.stderr, refused.stderr


def test_unreachable_service_exits_1(tmp_path: Path, sample_videos: list[Path]) -> None:
    from worker.cli.stack import free_port

    done = _ask(str(sample_videos[0]), "-q", QUESTION, "--server", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "unreachable" not in done.stdout and "no answer from" in done.stderr


def test_ctrl_c_cancels_the_job(service: RunningService, sample_videos: list[Path]) -> None:
    process = subprocess.Popen(
        [VIDEOQA, "ask", str(sample_videos[0]), "-q", QUESTION, "--frames", "8", "--max-new-tokens", "400"],
        env=_env(VIDEOQA_SERVER=service.base_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    first = process.stderr.readline()  # "job <id>: queued (0.0 s)"
    assert first.startswith("job "), first
    job_id = first.split()[1].rstrip(":")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    rest = process.stderr.read()
    assert f"cancelling job {job_id}" in rest, (first, rest, process.stdout.read() if process.stdout else "")
    assert Client(service.base_url).wait(job_id, timeout=60).status == "cancelled"
