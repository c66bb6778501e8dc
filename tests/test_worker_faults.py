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

from common.job_status import TERMINAL
from common.jobs import JobStatus
from tests.cluster import Cluster, running_cluster

# The broker hands a dead worker's job to another within the test, and a generation on a loaded
# machine still ends within the time limit.
REDELIVERY = {"VIDEOQA_VISIBILITY_TIMEOUT_S": "60", "VIDEOQA_TASK_TIME_LIMIT_S": "50"}
# Short, for the test of the limit itself.
SHORT_LIMIT = {"VIDEOQA_VISIBILITY_TIMEOUT_S": "12", "VIDEOQA_TASK_TIME_LIMIT_S": "10"}


@pytest.fixture()
def cluster(
    spare_redis_url: str, aws_env: dict[str, str], s3, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[Cluster]:
    with running_cluster(spare_redis_url, aws_env, tiny_model_dir, tmp_path, **REDELIVERY) as running:
        yield running


def test_sigkill_during_generation_redelivers_and_completes_once(cluster: Cluster, sample_videos: list[Path]) -> None:
    job_id = cluster.submit(sample_videos[0], frames=12, new_tokens=400)
    cluster.wait_for(job_id, {JobStatus.GENERATING})
    cluster.kill_gpu()
    assert cluster.jobs.get(job_id).status is JobStatus.GENERATING
    cluster.start_gpu()  # the restarted worker
    job = cluster.wait_for(job_id, TERMINAL)
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert job.attempts == 2
    assert job.result is not None and job.result["usage"]["completion_tokens"] > 0


class _Drip(http.server.BaseHTTPRequestHandler):
    """Sends a video so slowly that its download is still running when the test kills the worker."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(6000):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass


def test_a_poison_job_fails_after_three_attempts_and_others_flow(
    spare_redis_url: str, aws_env: dict[str, str], s3, tiny_model_dir: Path, sample_videos: list[Path], tmp_path: Path
) -> None:
    """The job takes down the process that runs it, every time (here: the CPU worker's pool
    process that its worker reports running the job, SIGKILLed); the fourth delivery fails it as
    poison. Limits long enough that no kill can come after the job's own time limit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    limits = {"VIDEOQA_VISIBILITY_TIMEOUT_S": "600", "VIDEOQA_TASK_TIME_LIMIT_S": "500"}
    with running_cluster(spare_redis_url, aws_env, tiny_model_dir, tmp_path, **limits) as cluster:
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/never-ending.mp4"
            created = cluster.client.post("/v1/jobs", json={"question": "q", "videos": [{"url": url}]})
            job_id = created.get_json()["id"]
            killed: set[int] = set()
            for attempt in range(1, 4):
                job = cluster.wait_for(job_id, {JobStatus.INGESTING} | TERMINAL, attempts=attempt)
                assert job.status is JobStatus.INGESTING and job.attempts == attempt, job
                pid = cluster.running_pid(job_id, not_in=frozenset(killed))
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            job = cluster.wait_for(job_id, TERMINAL)
            assert job.status is JobStatus.FAILED
            assert job.error is not None and job.error["code"] == "poison", job.error
            assert job.attempts == 4 and job.result is None
            other = cluster.submit(sample_videos[1], frames=2, new_tokens=3)
            assert cluster.wait_for(other, TERMINAL).status is JobStatus.SUCCEEDED
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
    done = cluster.wait_for(waiting, TERMINAL)
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 1


def test_a_job_past_its_time_limit_fails_with_timeout(
    spare_redis_url: str, aws_env: dict[str, str], s3, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The hard limit (10 s here) sits below the visibility timeout (12 s), so a job can never run
    long enough to be handed to a second worker; at the limit it fails with ``timeout``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with running_cluster(spare_redis_url, aws_env, tiny_model_dir, tmp_path, **SHORT_LIMIT) as cluster:
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/slow.mp4"
            job_id = cluster.client.post("/v1/jobs", json={"question": "q", "videos": [{"url": url}]}).get_json()["id"]
            job = cluster.wait_for(job_id, TERMINAL, timeout_s=240)
            assert job.status is JobStatus.FAILED
            assert job.error == {"code": "timeout", "message": "the job ran past its time limit"}
            assert job.attempts == 1
        finally:
            server.shutdown()
