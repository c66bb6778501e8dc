"""Redis (AOF, everysec) killed with SIGKILL and restarted under load: every accepted job completes
and the workers reconnect by themselves."""

from __future__ import annotations

import time
from pathlib import Path

import requests

from tests.conftest import service_env, start_service
from tests.redis_server import RedisServer
from worker.cli.stack import wait_for_http, wait_for_workers


def _submit(base: str, video: Path, n: int) -> str | None:
    with open(video, "rb") as handle:
        try:
            response = requests.post(
                f"{base}/v1/jobs",
                files=[("videos", (video.name, handle, "video/mp4"))],
                data={"question": f"job {n}?", "num_frames": "2", "max_new_tokens": "3"},
                timeout=10,
            )
        except requests.RequestException:
            return None
    if response.status_code == 202:
        return str(response.json()["id"])
    assert response.status_code == 503, response.text  # refused cleanly while Redis is away
    return None


def test_redis_killed_and_restarted_under_load(
    aws_env: dict[str, str], s3, tiny_model_dir: Path, sample_videos: list[Path], tmp_path: Path
) -> None:
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(data, "--appendonly", "yes", "--appendfsync", "everysec").start()
    env = service_env(
        server.url, aws_env, tiny_model_dir, VIDEOQA_RECONCILE_INTERVAL_S="2", VIDEOQA_RECONCILE_AFTER_S="10"
    )
    service = start_service(env, tmp_path)
    stack = service.stack
    try:
        wait_for_http(service.url("/healthz"))
        wait_for_workers(service.settings, ["cpu", "gpu0"], timeout_s=180)
        worker_pids = {name: p.pid for name, p in stack.processes.items()}
        accepted = [job for n in range(4) if (job := _submit(service.base_url, sample_videos[n % 2], n))]
        assert len(accepted) == 4

        server.kill()
        refused_while_down = _submit(service.base_url, sample_videos[0], 99)
        assert refused_while_down is None
        time.sleep(1.0)
        server.start()  # same port, same directory: the AOF brings the data back

        deadline = time.monotonic() + 60
        n = 4
        while len(accepted) < 8 and time.monotonic() < deadline:
            job = _submit(service.base_url, sample_videos[n % 2], n)
            n += 1
            if job:
                accepted.append(job)
            else:
                time.sleep(0.5)
        assert len(accepted) == 8

        outcomes = {job_id: service.wait(job_id, timeout_s=240) for job_id in accepted}
        statuses = {job_id: job["status"] for job_id, job in outcomes.items()}
        assert set(statuses.values()) == {"succeeded"}, (statuses, service.tail_logs())
        assert stack.exited() == {}
        assert {name: p.pid for name, p in stack.processes.items()} == worker_pids
    finally:
        stack.stop()
        server.stop()
