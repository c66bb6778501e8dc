"""Flower, started with the stack's own command and basic auth, against the test broker: it lists
the CPU and GPU workers with their queues, and shows a finished job's tasks with their states."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests

from tests.conftest import RunningService
from worker.cli.stack import Stack, flower_command, flower_env, free_port, wait_for_http

USER, PASSWORD = "ops", "flower-test-password"


def _poll(get: Any, done: Any, timeout_s: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = get()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_flower_shows_both_workers_and_the_tasks_of_a_finished_job(
    service: RunningService, sample_videos: list[Path], tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stack = Stack(env=service.env, logs=tmp_path)
    stack.start("flower", flower_command(port=port), extra_env=flower_env(USER, PASSWORD))
    try:
        wait_for_http(f"{base}/healthcheck", timeout_s=90)
        assert requests.get(f"{base}/api/workers", timeout=10).status_code == 401
        assert requests.get(f"{base}/api/workers", auth=(USER, "wrong"), timeout=10).status_code == 401

        def queues_by_worker() -> dict[str, list[str]]:
            workers = requests.get(
                f"{base}/api/workers", params={"refresh": "1"}, auth=(USER, PASSWORD), timeout=30
            ).json()
            return {name: [q["name"] for q in info.get("active_queues") or []] for name, info in workers.items()}

        workers = _poll(queues_by_worker, lambda w: {q for queues in w.values() for q in queues} >= {"cpu", "gpu"})
        assert any(name.startswith("cpu@") and queues == ["cpu"] for name, queues in workers.items()), workers
        assert any(name.startswith("gpu0@") and queues == ["gpu"] for name, queues in workers.items()), workers

        job_id = service.upload(sample_videos[0], question="Is it a cat?", num_frames="2", max_new_tokens="3")
        assert service.wait(job_id)["status"] == "succeeded"

        def job_tasks() -> dict[str, str]:
            tasks = requests.get(f"{base}/api/tasks", auth=(USER, PASSWORD), timeout=10).json()
            return {task["name"]: task["state"] for task in tasks.values() if job_id in str(task.get("args"))}

        states = _poll(job_tasks, lambda t: t == {"videoqa.ingest": "SUCCESS", "videoqa.generate": "SUCCESS"})
        assert states == {"videoqa.ingest": "SUCCESS", "videoqa.generate": "SUCCESS"}, (
            tmp_path / "flower.log"
        ).read_text()[-3000:]
    finally:
        stack.stop()
