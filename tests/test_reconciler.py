"""A job whose queue message is lost is found and sent again, by real workers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis

from api.app import create_app
from common.connections import redis_client
from common.jobs import JobStatus, JobStore
from common.settings import load_settings
from tests.conftest import service_env, start_process
from worker.app.reconciler import job_ids_in_flight, reconcile
from worker.cli.stack import Stack, cpu_worker_command, gpu_worker_command


def test_in_flight_ids_come_from_queues_and_unacked_messages(spare_redis_url: str) -> None:
    settings = load_settings({"VIDEOQA_REDIS_URL": spare_redis_url})
    from common.celery_config import make_celery

    make_celery(settings).send_task("videoqa.ingest", args=["queued-one"])
    client = redis.Redis.from_url(spare_redis_url)
    message = client.lpop("cpu")
    client.hset("unacked", "tag", json.dumps([json.loads(message), "", "cpu"]))
    make_celery(settings).send_task("videoqa.generate", args=["gpu-one"])
    assert job_ids_in_flight(client) == {"queued-one", "gpu-one"}


def test_only_stale_jobs_without_a_message_are_sent_again(spare_redis_url: str) -> None:
    from common.celery_config import make_celery

    settings = load_settings({"VIDEOQA_REDIS_URL": spare_redis_url})
    client = redis_client(settings)
    jobs = JobStore(client, ttl_s=600)
    lost, waiting, finished = (jobs.create({}) for _ in range(3))
    make_celery(settings).send_task("videoqa.ingest", args=[waiting.id])
    jobs.transition(finished.id, JobStatus.FAILED)
    sent: list[tuple[str, str]] = []

    def record(task: str, job_id: str) -> None:
        sent.append((task, job_id))

    assert reconcile(client, jobs, record, stale_after_s=60) == []  # nothing is stale yet
    assert reconcile(client, jobs, record, stale_after_s=60, now=time.time() + 120) == [lost.id]
    assert sent == [("videoqa.ingest", lost.id)]
    assert reconcile(client, jobs, record, stale_after_s=60) == []  # the resend refreshed it


def test_a_deleted_queue_message_does_not_lose_the_job(
    spare_redis_url: str, aws_env: dict[str, str], s3, tiny_model_dir: Path, sample_videos: list[Path], tmp_path: Path
) -> None:
    env = service_env(
        spare_redis_url, aws_env, tiny_model_dir, VIDEOQA_RECONCILE_INTERVAL_S="0.5", VIDEOQA_RECONCILE_AFTER_S="1"
    )
    settings = load_settings(env)
    client = create_app(settings).test_client()
    with open(sample_videos[1], "rb") as handle:
        created = client.post(
            "/v1/jobs",
            data={"question": "q", "num_frames": "2", "max_new_tokens": "3", "videos": [(handle, "cats_2.mp4")]},
            content_type="multipart/form-data",
        )
    job_id = created.get_json()["id"]
    broker = redis.Redis.from_url(spare_redis_url)
    assert broker.delete("cpu") == 1  # the message is gone, as after a Redis restart without persistence

    stack = Stack(env=env)
    start_process(stack, tmp_path, "cpu", cpu_worker_command(concurrency=1))
    start_process(stack, tmp_path, "gpu", gpu_worker_command())
    jobs = JobStore(redis_client(settings), ttl_s=60)
    try:
        deadline = time.monotonic() + 300  # two workers start first, on a machine that may be loaded
        while time.monotonic() < deadline:
            job = jobs.get(job_id)
            if job is not None and job.status.terminal:
                break
            time.sleep(0.3)
    finally:
        stack.stop()
    assert job is not None
    assert job.status is JobStatus.SUCCEEDED, (job.error, (tmp_path / "cpu.log").read_text()[-2000:])
    assert "sent again" in (tmp_path / "cpu.log").read_text()
