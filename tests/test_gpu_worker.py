"""A real GPU worker process (on the CPU here, with the tiny model) reading real Redis: readiness,
batches of queued jobs, cancellation mid-generation, and a model that cannot load.

Jobs are put straight into the GPU stage (frames in storage, status ``queued_gpu``, a generate
message in the queue) before the worker starts, so every queued job is there when the first
batch forms.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import readiness
from common.celery_config import GENERATE_TASK, make_celery
from common.connections import redis_client
from common.jobs import Job, JobStatus, JobStore
from common.settings import Settings, load_settings
from common.storage import ObjectStore, open_store
from tests.conftest import service_env
from worker.cli.stack import Stack, gpu_worker_command
from worker.gpu.lifecycle import EX_CONFIG
from worker.gpu.model import LoadedModel, load_model
from worker.media.png import encode_png

torch.set_num_threads(1)
HOSTNAME = f"gpu0@{socket.gethostname()}"


def frames(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)) for _ in range(count)]


def queue_gpu_job(
    settings: Settings, store: ObjectStore, images: list[Image.Image], question: str, max_new_tokens: int
) -> str:
    """A job as the CPU stage leaves it: frames stored, ``queued_gpu``, a generate message sent."""
    jobs = JobStore(redis_client(settings), ttl_s=settings.job_ttl_s)
    request = {
        "question": question,
        "prompt": None,
        "videos": [{"kind": "upload", "location": "unused"}],
        "images": [],
        "sampling": {"num_frames": len(images)},
        "generation": {"max_new_tokens": max_new_tokens},
    }
    job = jobs.create(request)
    entries = []
    for index, image in enumerate(images):
        key = f"frames/{job.id}/{index:04d}.png"
        store.put_bytes(key, encode_png(image), content_type="image/png")
        entries.append({"index": index, "time": index / 30, "key": key})
    media = [{"kind": "video", "position": 0, "frames": entries}]
    assert jobs.transition(job.id, JobStatus.QUEUED_GPU, media=media)
    make_celery(settings).send_task(GENERATE_TASK, args=[job.id])
    return job.id


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"VIDEOQA_MODEL": str(tiny_model_dir), "VIDEOQA_DEVICE": "cpu"}))


def unbatched(loaded: LoadedModel, images: list[Image.Image], question: str, max_new_tokens: int) -> list[int]:
    """What one plain greedy ``generate`` of this job alone gives."""
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = loaded.processor(text=[text], images=images, return_tensors="pt")
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture()
def worker_env(spare_redis_url: str, tiny_model_dir: Path, tmp_path: Path) -> dict[str, str]:
    return service_env(spare_redis_url, {}, tiny_model_dir, VIDEOQA_STORAGE_URL=str(tmp_path / "store"))


def wait_for(jobs: JobStore, job_ids: list[str], done: object, logs: Path, timeout_s: float = 120.0) -> list[Job]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = [jobs.get(job_id) for job_id in job_ids]
        if all(job is not None and done(job) for job in current):
            return current
        time.sleep(0.05)
    raise AssertionError(f"jobs did not get there: {current}\n{(logs / 'gpu.log').read_text()[-4000:]}")


def test_queued_jobs_are_generated_as_one_batch_with_their_unbatched_tokens(
    worker_env: dict[str, str], loaded: LoadedModel, tmp_path: Path
) -> None:
    """1, 3, 6 and 12 frames with different max_new_tokens, in one batch of a real worker."""
    settings = load_settings(worker_env)
    store, client = open_store(settings), redis_client(settings)
    jobs = JobStore(client, ttl_s=60)
    cases = [
        (frames(n, seed), f"question {seed}?", max_new)
        for seed, (n, max_new) in enumerate([(1, 7), (3, 20), (6, 3), (12, 15)])
    ]
    job_ids = [queue_gpu_job(settings, store, images, question, max_new) for images, question, max_new in cases]

    stack = Stack(env=worker_env, logs=tmp_path)
    batching = {"VIDEOQA_BATCH_SIZE": "4", "VIDEOQA_HEARTBEAT_INTERVAL_S": "1"}
    stack.start("gpu", gpu_worker_command(), extra_env=batching)
    try:
        finished = wait_for(jobs, job_ids, lambda job: job.status.terminal, tmp_path)
        ready = {worker.hostname: worker for worker in readiness.ready_workers(client)}
    finally:
        stack.stop()

    for job, (images, question, max_new) in zip(finished, cases, strict=True):
        assert job.status is JobStatus.SUCCEEDED, (job.error, (tmp_path / "gpu.log").read_text()[-3000:])
        assert job.result is not None and job.result["batch_size"] == 4
        expected = unbatched(loaded, images, question, max_new)
        assert job.result["answer"] == loaded.processor.tokenizer.decode(expected, skip_special_tokens=True)
        assert job.result["usage"]["completion_tokens"] == len(expected)
    # Different frames give different answers, or the equality above would prove little.
    assert len({job.result["answer"] for job in finished if job.result}) > 1

    worker = ready[HOSTNAME]
    assert (worker.model, worker.device, worker.dtype, worker.attn_implementation) == (
        worker_env["VIDEOQA_MODEL"],
        "cpu",
        "float32",
        "sdpa",
    )
    assert worker.batch_size == 4 and worker.free_memory_bytes > 0 and worker.revision is None
    # A stopped worker withdraws its readiness at once, not when the key expires.
    assert readiness.ready_workers(client) == []


def test_a_second_question_over_the_same_frames_reuses_their_prefill(
    worker_env: dict[str, str], loaded: LoadedModel, tmp_path: Path
) -> None:
    """Two jobs over the same frames (stored twice, under each job's own keys): the second
    prefills only its question, and both keep their solo answers."""
    settings = load_settings(worker_env)
    store, client = open_store(settings), redis_client(settings)
    jobs = JobStore(client, ttl_s=60)
    images = frames(4, 30)
    questions = ["What is happening in this video?", "How many people are walking in the street?"]
    job_ids = [queue_gpu_job(settings, store, images, question, 10) for question in questions]

    stack = Stack(env=worker_env, logs=tmp_path)
    stack.start("gpu", gpu_worker_command(), extra_env={"VIDEOQA_BATCH_SIZE": "2"})
    try:
        finished = wait_for(jobs, job_ids, lambda job: job.status.terminal, tmp_path)
    finally:
        stack.stop()

    usages = []
    for job, question in zip(finished, questions, strict=True):
        assert job.status is JobStatus.SUCCEEDED and job.result is not None, job.error
        expected = unbatched(loaded, images, question, 10)
        assert job.result["answer"] == loaded.processor.tokenizer.decode(expected, skip_special_tokens=True)
        usages.append(job.result["usage"])
    first, second = sorted(usages, key=lambda usage: usage["cached_tokens"])
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] >= 0.9 * second["prompt_tokens"]


def test_cancelling_a_generating_job_stops_it_and_spares_the_rest_of_its_batch(
    worker_env: dict[str, str], loaded: LoadedModel, tmp_path: Path
) -> None:
    from api.app import create_app

    settings = load_settings(worker_env)
    store, client = open_store(settings), redis_client(settings)
    jobs = JobStore(client, ttl_s=60)
    # Greedy answers of these prompts run ~3700 and ~1900 tokens before their first eos.
    long_frames, other_frames = frames(3, 2), frames(3, 0)
    long_id = queue_gpu_job(settings, store, long_frames, "question 2?", 3700)
    other_id = queue_gpu_job(settings, store, other_frames, "question 0?", 800)
    api = create_app(settings).test_client()

    stack = Stack(env=worker_env, logs=tmp_path)
    stack.start("gpu", gpu_worker_command(), extra_env={"VIDEOQA_BATCH_SIZE": "2"})
    try:
        wait_for(jobs, [long_id], lambda job: "start" in job.stages.get("generate", {}), tmp_path)
        response = api.delete(f"/v1/jobs/{long_id}")
        assert response.status_code == 200 and response.get_json()["status"] == "cancelled"
        # The worker marks the end of a cancelled job's generation when it stops it.
        (cancelled,) = wait_for(jobs, [long_id], lambda job: "end" in job.stages.get("generate", {}), tmp_path)
        (other,) = wait_for(jobs, [other_id], lambda job: job.status.terminal, tmp_path)
    finally:
        stack.stop()
    log = (tmp_path / "gpu.log").read_text()

    assert cancelled.status is JobStatus.CANCELLED and cancelled.result is None
    stopped_line = next(line for line in log.splitlines() if f"job {long_id} cancelled after" in line)
    generated = int(stopped_line.split("cancelled after ")[1].split()[0])
    assert generated < 3700
    # Stopped while the other job went on generating; that one's tokens are its own.
    assert cancelled.stages["generate"]["end"] < other.stages["generate"]["end"]
    assert other.status is JobStatus.SUCCEEDED and other.result is not None
    expected = unbatched(loaded, other_frames, "question 0?", 800)
    assert other.result["usage"]["completion_tokens"] == len(expected) == 800
    assert other.result["answer"] == loaded.processor.tokenizer.decode(expected, skip_special_tokens=True)


def test_a_model_that_cannot_load_stops_the_worker_with_a_clear_message(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    settings = load_settings(worker_env)
    stack = Stack(env=worker_env, logs=tmp_path)
    stack.start("gpu", gpu_worker_command(), extra_env={"VIDEOQA_MODEL": str(tmp_path / "no-such-model")})
    try:
        code = stack.processes["gpu"].wait(timeout=120)
    except subprocess.TimeoutExpired:
        stack.stop()
        raise
    log = (tmp_path / "gpu.log").read_text()
    assert code == EX_CONFIG, log[-3000:]
    assert f"cannot load {tmp_path / 'no-such-model'}" in log
    assert "this worker stops" in log
    # One line that says what to set.
    (line,) = [text for text in log.splitlines() if "this worker stops" in text]
    assert "VIDEOQA_MODEL" in line and "videoqa tiny-model" in line
    assert readiness.ready_workers(redis_client(settings)) == []
