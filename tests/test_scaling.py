"""Horizontal scaling: two GPU workers (tiny model on the CPU, one thread each) on one queue share
eight jobs. The same stack's logs are checked: JSON lines, job ids on the lines about jobs, and
no credentials (its Redis URL carries a password)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import requests

from common.job_status import TERMINAL
from common.logging_config import JOB_ID_PATTERN
from tests.conftest import service_env
from worker.cli.stack import ServicePlan, Stack, free_port

SECRET = "scaling-test-secret-4711"
JOBS = 8


def _json_lines(path: Path) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        entry = json.loads(line)  # every line is one JSON object
        assert isinstance(entry, dict), (path.name, number, line)
        assert {"ts", "level", "logger", "message"} <= set(entry), (path.name, number, line)
        entries.append(entry)
    return entries


def test_two_gpu_workers_on_one_queue_share_eight_jobs(
    spare_redis_url: str, tiny_model_dir: Path, sample_videos: list[Path], tmp_path: Path
) -> None:
    # Redis accepts any password for its passwordless default user, so the URL can carry one.
    redis_url = spare_redis_url.replace("redis://", f"redis://default:{SECRET}@")
    env = service_env(
        redis_url, {}, tiny_model_dir, VIDEOQA_STORAGE_URL=str(tmp_path / "store"), VIDEOQA_BATCH_SIZE="1"
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    plan = ServicePlan(port=free_port(), api_workers=1, cpu_concurrency=1, gpu_workers=2)
    base = plan.base_url
    stack = Stack(env=env, logs=logs)
    try:
        stack.start_service(plan, wait_s=180)
        job_ids = []
        for _ in range(JOBS):
            with open(sample_videos[0], "rb") as handle:
                response = requests.post(
                    f"{base}/v1/jobs",
                    files=[("videos", ("cats_1.mp4", handle, "video/mp4"))],
                    data={"question": "What is the cat doing?", "num_frames": "2", "max_new_tokens": "24"},
                    timeout=30,
                )
            assert response.status_code == 202, response.text
            job_ids.append(response.json()["id"])
        deadline = time.monotonic() + 300
        pending = set(job_ids)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                job = requests.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
                if job["status"] in TERMINAL:
                    assert job["status"] == "succeeded", job
                    pending.discard(job_id)
            time.sleep(0.2)
        assert not pending, f"unfinished: {pending}"

        entries = {name: _json_lines(logs / f"{name}.log") for name in ("api", "cpu", "gpu0", "gpu1")}
    finally:
        stack.stop()

    # Both GPU workers did some of the jobs, and together all of them.
    done_by = {name: {e["job_id"] for e in entries[name] if "job_id" in e} for name in ("gpu0", "gpu1")}
    assert done_by["gpu0"] and done_by["gpu1"], done_by
    assert done_by["gpu0"] | done_by["gpu1"] == set(job_ids)

    for name, lines in entries.items():
        for entry in lines:
            text = json.dumps(entry)
            assert SECRET not in text, (name, entry)
            # A line that names a job carries its id as a field.
            for found in JOB_ID_PATTERN.findall(entry["message"]):
                assert entry.get("job_id") == found, (name, entry)
    for job_id in job_ids:
        assert any(
            e.get("job_id") == job_id and e.get("method") == "POST" and e.get("status") == 202 for e in entries["api"]
        )
        assert any(e.get("job_id") == job_id for e in entries["cpu"])
