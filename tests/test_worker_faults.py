"""Real GPU workers killed mid-generation: SIGKILL, a poison job, SIGTERM."""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.app import create_app
from common.connections import redis_client
from common.jobs import Job, JobStatus, JobStore
from common.settings import Settings, load_settings
from tests.conftest import service_env, start_process
from worker.stack import Stack, cpu_worker_command, gpu_worker_command

# Short enough that the broker hands a dead worker's job to another within the test.
FAST_REDELIVERY = {"VIDEOQA_VISIBILITY_TIMEOUT_S": "12", "VIDEOQA_TASK_TIME_LIMIT_S": "10"}


class Cluster:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.settings: Settings = load_settings(env)
        self.stack = Stack(env=env)
        self.jobs = JobStore(redis_client(self.settings), ttl_s=600)
        self.client = create_app(self.settings).test_client()
        self.gpu_starts = 0

    def start_gpu(self) -> None:
        self.gpu_starts += 1
        start_process(self.stack, self.logs, f"gpu{self.gpu_starts}", gpu_worker_command())

    def gpu_pid(self) -> int:
        return self.stack.processes[f"gpu{self.gpu_starts}"].pid

    def submit(self, video: Path, frames: int, new_tokens: int) -> str:
        with open(video, "rb") as handle:
            response = self.client.post(
                "/v1/jobs",
                data={"question": "q", "num_frames": str(frames), "max_new_tokens": str(new_tokens), "videos": [(handle, video.name)]},
                content_type="multipart/form-data",
            )
        return str(response.get_json()["id"])

    def wait_for(self, job_id: str, statuses: set[JobStatus], timeout_s: float = 180, attempts: int = 0) -> Job:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.jobs.get(job_id)
            if job is not None and job.status in statuses and (job.attempts >= attempts or job.status in ENDED):
                return job
            time.sleep(0.05)
        raise AssertionError(f"{job_id} never reached {statuses}: {self.jobs.get(job_id)}")

    def kill_gpu(self, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.gpu_pid(), sig)
        self.stack.processes[f"gpu{self.gpu_starts}"].wait(60)


@pytest.fixture()
def cluster(spare_redis_url: str, aws_env: dict[str, str], s3, tiny_model_dir: Path, tmp_path: Path) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    env = service_env(spare_redis_url, aws_env, tiny_model_dir, VIDEOQA_BATCH_SIZE="1", **FAST_REDELIVERY)
    env["VIDEOQA_DOWNLOAD_READ_TIMEOUT_S"] = "120"
    running = Cluster(env, tmp_path)
    start_process(running.stack, tmp_path, "cpu", cpu_worker_command(concurrency=1))
    running.start_gpu()
    try:
        yield running
    finally:
        running.stack.stop()


ENDED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


def test_sigkill_during_generation_redelivers_and_completes_once(cluster: Cluster, sample_videos: list[Path]) -> None:
    job_id = cluster.submit(sample_videos[0], frames=12, new_tokens=400)
    cluster.wait_for(job_id, {JobStatus.GENERATING})
    cluster.kill_gpu()
    assert cluster.jobs.get(job_id).status is JobStatus.GENERATING  # type: ignore[union-attr]
    cluster.start_gpu()  # the restarted worker
    job = cluster.wait_for(job_id, ENDED)
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert job.attempts == 2
    assert job.result is not None and job.result["usage"]["completion_tokens"] > 0


class _Drip(http.server.BaseHTTPRequestHandler):
    """Sends a video so slowly that its download is still running when the test kills the worker."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(600):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_poison_job_fails_after_three_attempts_and_others_flow(cluster: Cluster, sample_videos: list[Path]) -> None:
    """The job takes down the process that runs it, every time (here: the CPU worker's child,
    SIGKILLed while it works on the job); the fourth delivery fails it as poison."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/never-ending.mp4"
        created = cluster.client.post("/v1/jobs", json={"question": "q", "videos": [{"url": url}]})
        job_id = created.get_json()["id"]
        cpu = cluster.stack.processes["cpu"].pid
        for attempt in range(1, 4):
            job = cluster.wait_for(job_id, {JobStatus.INGESTING} | ENDED, attempts=attempt)
            assert job.status is JobStatus.INGESTING and job.attempts == attempt
            for child in _children(cpu):
                os.kill(child, signal.SIGKILL)
        job = cluster.wait_for(job_id, ENDED)
        assert job.status is JobStatus.FAILED
        assert job.error is not None and job.error["code"] == "poison", job.error
        assert job.attempts == 4 and job.result is None
        other = cluster.submit(sample_videos[1], frames=2, new_tokens=3)
        assert cluster.wait_for(other, ENDED).status is JobStatus.SUCCEEDED
    finally:
        server.shutdown()


def test_sigterm_finishes_the_running_job_and_loses_none(cluster: Cluster, sample_videos: list[Path]) -> None:
    running = cluster.submit(sample_videos[0], frames=8, new_tokens=80)
    waiting = cluster.submit(sample_videos[1], frames=8, new_tokens=80)
    cluster.wait_for(running, {JobStatus.GENERATING})
    cluster.kill_gpu(signal.SIGTERM)  # warm shutdown: waits for the running task
    first = cluster.jobs.get(running)
    assert first is not None and first.status is JobStatus.SUCCEEDED, first
    assert first.attempts == 1
    second = cluster.jobs.get(waiting)
    assert second is not None and second.status in {JobStatus.QUEUED_GPU, JobStatus.QUEUED, JobStatus.INGESTING}
    cluster.start_gpu()
    done = cluster.wait_for(waiting, ENDED)
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 1


def test_a_job_past_its_time_limit_fails_with_timeout(cluster: Cluster) -> None:
    """The hard limit (10 s here) sits below the visibility timeout (12 s), so a job can never run
    long enough to be handed to a second worker; at the limit it fails with ``timeout``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/slow.mp4"
        job_id = cluster.client.post("/v1/jobs", json={"question": "q", "videos": [{"url": url}]}).get_json()["id"]
        job = cluster.wait_for(job_id, ENDED, timeout_s=120)
        assert job.status is JobStatus.FAILED
        assert job.error == {"code": "timeout", "message": "the job ran past its time limit"}
        assert job.attempts == 1
    finally:
        server.shutdown()
