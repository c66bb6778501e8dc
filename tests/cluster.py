"""A CPU worker and a GPU worker of our own on the spare database, for tests that kill them: jobs
submitted through the app, waits on job states, the pool process that runs a job, and what the
broker holds when a wait gives up."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from api.app import create_app
from common.celery_config import CPU_QUEUE, GPU_QUEUE, make_celery
from common.connections import redis_client
from common.job_status import TERMINAL
from common.jobs import Job, JobStatus, JobStore
from common.settings import Settings, load_settings
from tests.conftest import service_env
from worker.cli.stack import Stack, cpu_worker_command, gpu_worker_command


class Cluster:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.settings: Settings = load_settings(env)
        self.stack = Stack(env=env, logs=self.logs)
        self.jobs = JobStore(redis_client(self.settings), ttl_s=600)
        self.client = create_app(self.settings).test_client()
        self.gpu_starts = 0
        self.cpu_starts = 0

    def start_gpu(self) -> None:
        self.gpu_starts += 1
        self.stack.start(f"gpu{self.gpu_starts}", gpu_worker_command())

    def gpu_pid(self) -> int:
        return self.stack.processes[f"gpu{self.gpu_starts}"].pid

    def start_cpu(self, app: str = "worker.cpu_app", **extra_env: str) -> str:
        """A CPU worker (one pool process) running ``app``; its name in ``stack.processes``."""
        self.cpu_starts += 1
        name = f"cpu{self.cpu_starts}"
        argv = [app if arg == "worker.cpu_app" else arg for arg in cpu_worker_command(concurrency=1)]
        self.stack.start(name, argv, extra_env=extra_env)
        return name

    def submit(self, video: Path, frames: int, new_tokens: int) -> str:
        with open(video, "rb") as handle:
            response = self.client.post(
                "/v1/jobs",
                data={
                    "question": "q",
                    "num_frames": str(frames),
                    "max_new_tokens": str(new_tokens),
                    "videos": [(handle, video.name)],
                },
                content_type="multipart/form-data",
            )
        return str(response.get_json()["id"])

    def wait_for(self, job_id: str, statuses: set[JobStatus], timeout_s: float = 240, attempts: int = 0) -> Job:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.jobs.get(job_id)
            if job is not None and job.status in statuses and (job.attempts >= attempts or job.status in TERMINAL):
                return job
            time.sleep(0.05)
        raise AssertionError(f"{job_id} never reached {statuses}: {self.jobs.get(job_id)}\n{self.diagnosis()}")

    def running_pid(self, job_id: str, not_in: frozenset[int] = frozenset(), timeout_s: float = 120) -> int:
        """The pool process running ``job_id``'s task, as its worker reports it: the worker has
        recorded that this process accepted the task, so killing it is a death mid-task."""
        inspect = make_celery(self.settings).control.inspect(timeout=2.0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for requests in (inspect.active() or {}).values():
                for request in requests:
                    pid = request.get("worker_pid")
                    if job_id in json.dumps(request.get("args")) and pid and pid not in not_in:
                        return int(pid)
            time.sleep(0.1)
        raise AssertionError(f"no process reported running {job_id}\n{self.diagnosis()}")

    def kill_gpu(self, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.gpu_pid(), sig)
        self.stack.processes[f"gpu{self.gpu_starts}"].wait(60)

    def diagnosis(self) -> str:
        """What the broker holds (queued messages, delivery tags left unacknowledged and their
        age) and the end of each worker's log: the evidence a stalled job needs."""
        return broker_state(redis.Redis.from_url(self.settings.redis_url)) + "\n" + self.stack.tail_logs(4000)


def _job_of(message: dict) -> str:
    return str(message.get("headers", {}).get("argsrepr"))


def broker_state(client: redis.Redis) -> str:
    queued = {
        queue: [_job_of(json.loads(raw)) for raw in client.lrange(queue, 0, -1)] for queue in (CPU_QUEUE, GPU_QUEUE)
    }
    now = time.time()
    unacked = {
        tag.decode(): (_job_of(json.loads(raw)[0]), round(now - (client.zscore("unacked_index", tag) or now), 1))
        for tag, raw in client.hgetall("unacked").items()
    }
    return f"queued: {queued}; unacked (tag: job, seconds since delivery): {unacked}"


@contextmanager
def running_cluster(
    redis_url: str, aws_env: dict[str, str], model_dir: Path, logs: Path, *, cpu: bool = True, **extra: str
) -> Iterator[Cluster]:
    env = service_env(redis_url, aws_env, model_dir, VIDEOQA_BATCH_SIZE="1", **extra)
    env.setdefault("VIDEOQA_DOWNLOAD_READ_TIMEOUT_S", "120")
    running = Cluster(env, logs)
    if cpu:
        running.start_cpu()
    running.start_gpu()
    try:
        yield running
    finally:
        running.stack.stop()
