"""Object storage unreachable for a while: the stages retry with backoff and the job succeeds when
it comes back; a longer outage fails the job with storage_unavailable."""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.app import create_app
from common.connections import redis_client
from common.jobs import Job, JobStore
from common.settings import Settings, load_settings
from tests.conftest import service_env
from worker.cli.stack import Stack, cpu_worker_command, free_port, gpu_worker_command, wait_for_http


class MotoServer:
    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as handle:  # the server keeps its own copy
            self.process = subprocess.Popen(
                [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=handle, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for_http(f"http://127.0.0.1:{self.port}/moto-api/")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture()
def media_url(sample_videos: list[Path]) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(sample_videos[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cats_1.mp4"
    server.shutdown()


def _run(settings: Settings, media_url: str) -> str:
    client = create_app(settings).test_client()
    body = {
        "question": "q",
        "videos": [{"url": media_url}],
        "sampling": {"num_frames": 2},
        "generation": {"max_new_tokens": 3},
    }
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["id"])


def _wait(settings: Settings, job_id: str, timeout_s: float) -> Job:
    jobs = JobStore(redis_client(settings), ttl_s=60)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = jobs.get(job_id)
        if job is not None and job.status.terminal:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end: {jobs.get(job_id)}")


@pytest.mark.parametrize("outage", ["short", "long"])
def test_storage_outage(
    outage: str, spare_redis_url: str, tiny_model_dir: Path, media_url: str, tmp_path: Path
) -> None:
    port = free_port()
    moto = MotoServer(port, tmp_path / "moto.log")
    aws = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "t",
        "AWS_SECRET_ACCESS_KEY": "t",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    retries = "6" if outage == "short" else "2"
    env = service_env(
        spare_redis_url, aws, tiny_model_dir, VIDEOQA_TRANSIENT_RETRIES=retries, VIDEOQA_RETRY_BACKOFF_S="1"
    )
    settings = load_settings(env)
    stack = Stack(env=env, logs=tmp_path)
    stack.start("cpu", cpu_worker_command(concurrency=1))
    stack.start("gpu", gpu_worker_command())
    try:
        job_id = _run(settings, media_url)  # storage is down from the start
        if outage == "short":
            log = tmp_path / "cpu.log"
            deadline = time.monotonic() + 120
            # Storage comes back only once the worker has met the outage and scheduled a retry.
            while "Retry in" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "Retry in" in log.read_text(), log.read_text()[-3000:]
            moto.start()
            job = _wait(settings, job_id, 180)
            assert job.status == "succeeded", (job.error, log.read_text()[-3000:])
        else:
            job = _wait(settings, job_id, 180)
            assert job.status == "failed"
            assert job.error is not None and job.error["code"] == "storage_unavailable", job.error
    finally:
        stack.stop()
        moto.stop()
