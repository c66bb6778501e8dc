"""A batch survives its worst member, with a real GPU worker process (tiny model, on the CPU):
jobs whose preparation fails, malformed messages on the ``gpu`` queue, and Redis going away while
the batch generates. The other jobs of the batch end with exactly their unbatched answers.

Jobs are put straight into the GPU stage before the worker starts (see test_gpu_worker.py), so
every queued job and message is there when the first batch forms.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from common.connections import redis_client
from common.jobs import Job, JobStatus, JobStore
from common.settings import load_settings
from common.storage import open_store
from tests.conftest import service_env
from tests.redis_server import RedisServer
from tests.test_batching_queue import publish_malformed
from tests.test_gpu_worker import frames, queue_gpu_job, unbatched, wait_for
from worker.cli.stack import Stack, gpu_worker_command
from worker.gpu.model import LoadedModel, load_model

# GPU workers and a Redis of their own run as processes.
pytestmark = pytest.mark.service

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"VIDEOQA_MODEL": str(tiny_model_dir), "VIDEOQA_DEVICE": "cpu"}))


def _assert_unbatched(
    loaded: LoadedModel, job: Job, images: list, question: str, max_new_tokens: int, log: str
) -> None:
    assert job.status is JobStatus.SUCCEEDED, (job.error, log[-3000:])
    assert job.result is not None
    expected = unbatched(loaded, images, question, max_new_tokens)
    assert job.result["answer"] == loaded.processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert job.result["usage"]["completion_tokens"] == len(expected)


def test_jobs_that_cannot_be_prepared_and_malformed_messages_fail_alone(
    spare_redis_url: str, tiny_model_dir: Path, loaded: LoadedModel, tmp_path: Path
) -> None:
    env = service_env(spare_redis_url, {}, tiny_model_dir, VIDEOQA_STORAGE_URL=str(tmp_path / "store"))
    settings = load_settings(env)
    store, client = open_store(settings), redis_client(settings)
    jobs = JobStore(client, ttl_s=600)
    good = [(frames(2, 0), "question 0?", 9), (frames(3, 1), "question 1?", 14)]
    first = queue_gpu_job(settings, store, *good[0])
    missing = queue_gpu_job(settings, store, frames(2, 5), "question 5?", 5)
    (tmp_path / "store" / "frames" / missing / "0001.png").unlink()  # expired, or deleted meanwhile
    # A record the API would refuse (it checks text is valid Unicode); here it reaches the worker.
    unreadable = queue_gpu_job(settings, store, frames(1, 6), "a lone \ud800 surrogate", 5)
    marker = tmp_path / "unpickled"
    publish_malformed(settings.redis_url, marker)
    last = queue_gpu_job(settings, store, *good[1])

    stack = Stack(env=env, logs=tmp_path)
    stack.start("gpu", gpu_worker_command(), extra_env={"VIDEOQA_BATCH_SIZE": "8"})
    try:
        ended = wait_for(jobs, [first, missing, unreadable, last], lambda job: job.status.terminal, tmp_path)
        deadline = time.monotonic() + 30
        while (client.llen("gpu") or client.hlen("unacked")) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stack.stop()
    log = (tmp_path / "gpu.log").read_text()

    by_id = {job.id: job for job in ended}
    assert by_id[missing].status is JobStatus.FAILED and by_id[missing].error is not None
    assert by_id[missing].error["code"] == "not_found"
    assert by_id[unreadable].status is JobStatus.FAILED and by_id[unreadable].error is not None
    assert by_id[unreadable].error["code"] == "invalid_request"
    for job_id, (images, question, max_new) in zip((first, last), good, strict=True):
        _assert_unbatched(loaded, by_id[job_id], images, question, max_new, log)
        assert by_id[job_id].result["batch_size"] == 2
    # Each malformed message was refused once and removed; none was unpickled.
    assert log.count("malformed message from the gpu queue") == 5, log[-4000:]
    assert client.llen("gpu") == 0 and client.hlen("unacked") == 0
    assert not marker.exists()


def _wait_for_line(log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{log.name} never said {text!r}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def test_redis_out_of_reach_while_a_batch_generates_is_ridden_out(
    tiny_model_dir: Path, loaded: LoadedModel, tmp_path: Path
) -> None:
    """Redis is killed while the batch generates and started again on its data (an append-only
    file written at every command) once a cancellation poll has failed for it. The answers are
    long enough to outlast the outage on a fast machine; a slow one only makes them outlast it
    more (a job that ended within the outage would meet a refused result write, another path)."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always").start()
    try:
        env = service_env(server.url, {}, tiny_model_dir, VIDEOQA_STORAGE_URL=str(tmp_path / "store"))
        settings = load_settings(env)
        store = open_store(settings)
        jobs = JobStore(redis_client(settings), ttl_s=600)
        cases = [(frames(3, 2), "question 2?", 2000), (frames(3, 0), "question 0?", 1200)]
        job_ids = [queue_gpu_job(settings, store, images, question, max_new) for images, question, max_new in cases]

        stack = Stack(env=env, logs=tmp_path)
        stack.start("gpu", gpu_worker_command(), extra_env={"VIDEOQA_BATCH_SIZE": "2"})
        try:
            wait_for(jobs, job_ids[:1], lambda job: "start" in job.stages.get("generate", {}), tmp_path)
            server.kill()
            _wait_for_line(tmp_path / "gpu.log", "cannot read cancellations", timeout_s=120)
            server.start()
            ended = wait_for(jobs, job_ids, lambda job: job.status.terminal, tmp_path, timeout_s=240)
        finally:
            stack.stop()
    finally:
        server.stop()
    log = (tmp_path / "gpu.log").read_text()

    assert log.count("cannot read cancellations") == 1, log[-4000:]
    for job, (images, question, max_new) in zip(ended, cases, strict=True):
        _assert_unbatched(loaded, job, images, question, max_new, log)
        # Generated once, in one batch: not failed, not delivered again.
        assert job.attempts == 1 and job.result is not None and job.result["batch_size"] == 2
