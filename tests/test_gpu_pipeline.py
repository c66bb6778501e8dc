"""The GPU worker's pipeline on the CPU with the tiny model: pixel values made from uint8 frames
equal the image processor's, the dtype setting, jobs claimed and loaded ahead from the real Redis
broker (untouched until they start, back in the queue when not started, cancelled ones stay
cancelled), and a real worker process going from batch to batch with answers equal to solo ones.
"""

from __future__ import annotations

import base64
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import redis
import torch

from common.celery_config import GPU_QUEUE, make_celery
from common.connections import redis_client
from common.jobs import JobStatus, JobStore
from common.schemas import Generation
from common.settings import Settings, SettingsError, load_settings
from common.storage import open_store
from tests.test_gpu_worker import frames, loaded, queue_gpu_job, unbatched, wait_for, worker_env  # noqa: F401 - fixtures
from worker.app.resources import prefetch_enabled
from worker.cli.stack import Stack, gpu_worker_command
from worker.gpu.claims import GpuQueue
from worker.gpu.model import LoadedModel, ModelLoadError, Prompt, encode_prompt, generate_one_call, load_model
from worker.gpu.pixels import host_pixels, to_model_input
from worker.gpu.precision import resolve_dtype
from worker.gpu.prefetch import Prefetcher, with_own_processor
from worker.gpu.stage import AnswerContext, answer_jobs, load_job

torch.set_num_threads(1)


def _queued_job_ids(client: redis.Redis) -> list[str]:
    bodies = [json.loads(raw) for raw in reversed(client.lrange(GPU_QUEUE, 0, -1))]
    return [json.loads(base64.b64decode(body["body"]))[0][0] for body in bodies]


def test_pixel_values_made_on_the_device_equal_the_image_processors(loaded: LoadedModel) -> None:  # noqa: F811
    images = frames(3, 7)
    expected = loaded.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert loaded.normalisation is not None
    made = to_model_input(host_pixels(images, pin=False), loaded.normalisation, "cpu", torch.float32)
    assert made.shape == expected.shape and made.dtype == expected.dtype
    assert torch.allclose(made, expected, rtol=0, atol=1e-6), (made - expected).abs().max()
    # A stored frame (at the model's size) is encoded as uint8; another size keeps the processor's path.
    encoded = encode_prompt(loaded, Prompt(text="<image>", images=images[:1]))
    assert encoded.pixels is not None and encoded.pixels.dtype == torch.uint8 and encoded.pixel_values is None
    other = encode_prompt(loaded, Prompt(text="<image>", images=[images[0].resize((200, 100))]))
    assert other.pixels is None and other.pixel_values is not None


def test_prefetch_setting_is_on_with_cuda_only_unless_set() -> None:
    assert load_settings({}).prefetch == "auto"
    # The boolean it was before `auto` keeps its meaning.
    assert load_settings({"VIDEOQA_PREFETCH": "true"}).prefetch == "on"
    assert load_settings({"VIDEOQA_PREFETCH": "0"}).prefetch == "off"
    assert Settings(prefetch=None).prefetch == "auto"
    with pytest.raises(SettingsError, match="VIDEOQA_PREFETCH"):
        load_settings({"VIDEOQA_PREFETCH": "sometimes"})
    assert prefetch_enabled("auto", "cuda:0") and not prefetch_enabled("auto", "cpu")
    assert prefetch_enabled("on", "cpu") and not prefetch_enabled("off", "cuda")


def test_dtype_setting_refuses_combinations_that_cannot_run() -> None:
    with pytest.raises(SettingsError, match="VIDEOQA_DTYPE=float16 is not supported with VIDEOQA_DEVICE=cpu"):
        load_settings({"VIDEOQA_DTYPE": "float16", "VIDEOQA_DEVICE": "cpu"})
    with pytest.raises(SettingsError, match="flash_attention_2 runs only in float16 or bfloat16"):
        load_settings({"VIDEOQA_DTYPE": "float32", "VIDEOQA_ATTN_IMPLEMENTATION": "flash_attention_2"})
    with pytest.raises(SettingsError, match="VIDEOQA_DTYPE"):
        load_settings({"VIDEOQA_DTYPE": "half"})
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.float16
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    # `auto` devices are only known at load: float16 that lands on the CPU is refused there.
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        resolve_dtype("float16", "cpu")


def test_a_cpu_worker_in_bfloat16_loads_and_answers(tiny_model_dir: Path) -> None:
    """Token identity with float32 is not expected in bfloat16: only that it loads and answers."""
    bf16 = load_model(
        load_settings({"VIDEOQA_MODEL": str(tiny_model_dir), "VIDEOQA_DEVICE": "cpu", "VIDEOQA_DTYPE": "bfloat16"})
    )
    assert bf16.dtype == "bfloat16" and bf16.model.dtype == torch.bfloat16
    text = bf16.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    (completion,) = generate_one_call(
        bf16, [Prompt(text=text, images=frames(1, 3), generation=Generation(max_new_tokens=5))]
    )
    assert 1 <= completion.completion_tokens <= 5 and completion.prompt_tokens > 729


def test_a_float16_worker_on_the_cpu_stops_with_a_clear_message(tiny_model_dir: Path) -> None:
    settings = load_settings({"VIDEOQA_MODEL": str(tiny_model_dir), "VIDEOQA_DTYPE": "float16"})  # device auto
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: float16 is valid here")
    with pytest.raises(ModelLoadError, match="float16 is not supported on the CPU"):
        load_model(settings)


def _context(settings: Settings, model: LoadedModel) -> AnswerContext:
    jobs = JobStore(redis_client(settings), ttl_s=600)
    return AnswerContext(jobs=jobs, store=open_store(settings), model=model, fetch_pool=ThreadPoolExecutor(4))


def _prefetcher(settings: Settings, ctx: AnswerContext, capacity: int) -> Prefetcher:
    queue = GpuQueue(make_celery(settings), hostname="gpu0@test", max_retries=2)
    ahead = replace(ctx, model=with_own_processor(ctx.model))  # as the worker loads jobs ahead
    return Prefetcher(
        queue, lambda job_id: load_job(job_id, ahead), capacity=capacity,
        needs_nothing=lambda ahead: ahead.job is not None and ahead.job.status.terminal,
    )  # fmt: skip


def test_jobs_loaded_ahead_stay_queued_and_go_back_to_the_queue_unless_started(
    local_settings: Settings,
    loaded: LoadedModel,  # noqa: F811
) -> None:
    ctx = _context(local_settings, loaded)
    store = ctx.store
    cases = [(frames(2, seed), f"question {seed}?", 4) for seed in range(3)]
    ids = [queue_gpu_job(local_settings, store, images, question, new) for images, question, new in cases]
    broker = redis.Redis.from_url(local_settings.redis_url, decode_responses=True)

    with _prefetcher(local_settings, ctx, capacity=2) as prefetcher:
        prefetcher.start()
        taken = prefetcher.take_waiting(2, wait_s=120)
        assert [item.claim.job_id for item in taken] == ids[:2]
        for job_id in ids:
            job = ctx.jobs.get(job_id)
            assert job is not None and job.status is JobStatus.QUEUED_GPU and job.attempts == 0
        assert all(item.loaded.prompt.encoded.pixels is not None for item in taken)
        # The first one starts and ends; its message is acknowledged after the answer is written.
        first = taken[0]
        assert answer_jobs([ids[0]], ctx, {ids[0]: first.loaded}) == {}
        prefetcher.done(first.claim)
    # Closing (a shutdown): the one taken but not started and the one held ahead go back.
    assert sorted(_queued_job_ids(broker)) == sorted(ids[1:]) and broker.hlen("unacked") == 0
    done = ctx.jobs.get(ids[0])
    assert done is not None and done.status is JobStatus.SUCCEEDED and done.attempts == 1
    images, question, new = cases[0]
    expected = unbatched(loaded, images, question, new)
    assert done.result is not None and done.result["answer"] == loaded.processor.tokenizer.decode(
        expected, skip_special_tokens=True
    )
    for job_id in ids[1:]:
        job = ctx.jobs.get(job_id)
        assert job is not None and job.status is JobStatus.QUEUED_GPU and job.attempts == 0


def test_cancelled_jobs_held_ahead_end_cancelled(local_settings: Settings, loaded: LoadedModel) -> None:  # noqa: F811
    ctx = _context(local_settings, loaded)
    ids = [queue_gpu_job(local_settings, ctx.store, frames(1, seed), f"question {seed}?", 4) for seed in range(2)]
    ctx.jobs.cancel(ids[0])  # cancelled while queued: needs nothing, acknowledged at once
    broker = redis.Redis.from_url(local_settings.redis_url, decode_responses=True)
    with _prefetcher(local_settings, ctx, capacity=2) as prefetcher:
        prefetcher.start()
        (held,) = prefetcher.take_waiting(2, wait_s=120)
        assert held.claim.job_id == ids[1]
        ctx.jobs.cancel(ids[1])  # cancelled after it was loaded, before it starts
        assert answer_jobs([ids[1]], ctx, {ids[1]: held.loaded}) == {}
        prefetcher.done(held.claim)
    assert broker.llen(GPU_QUEUE) == 0 and broker.hlen("unacked") == 0
    for job_id in ids:
        job = ctx.jobs.get(job_id)
        assert job is not None and job.status is JobStatus.CANCELLED and job.result is None and job.attempts == 0


@pytest.mark.parametrize("inflight", ["true", "false"])
def test_a_worker_runs_batch_after_batch_from_prefetched_jobs_with_solo_answers(
    worker_env: dict[str, str],  # noqa: F811
    loaded: LoadedModel,  # noqa: F811
    tmp_path: Path,
    inflight: str,
) -> None:
    settings = load_settings(worker_env)
    store, client = open_store(settings), redis_client(settings)
    jobs = JobStore(client, ttl_s=60)
    cases = [(frames(1 + seed % 3, seed), f"question {seed}?", 3 + 2 * seed) for seed in range(6)]
    job_ids = [queue_gpu_job(settings, store, images, question, new) for images, question, new in cases]

    stack = Stack(env=worker_env, logs=tmp_path)
    stack.start(
        "gpu", gpu_worker_command(),
        extra_env={"VIDEOQA_BATCH_SIZE": "2", "VIDEOQA_PREFETCH": "on", "VIDEOQA_INFLIGHT_BATCHING": inflight},
    )  # fmt: skip
    try:
        finished = wait_for(jobs, job_ids, lambda job: job.status.terminal, tmp_path, timeout_s=300)
    finally:
        stack.stop()
    log = (tmp_path / "gpu.log").read_text()
    for job, (images, question, new) in zip(finished, cases, strict=True):
        assert job.status is JobStatus.SUCCEEDED, (job.error, log[-3000:])
        assert job.attempts == 1
        expected = unbatched(loaded, images, question, new)
        assert job.result is not None and job.result["answer"] == loaded.processor.tokenizer.decode(
            expected, skip_special_tokens=True
        )
    # The first delivery went on with the jobs loaded while its batches generated: in flight they
    # join the running batch as rows free up; otherwise they make the next batches.
    delivery = re.search(r"ran (\d+) batches in [0-9.]+ s from one delivery, (\d+) prefetched jobs joining", log)
    assert delivery is not None, log[-3000:]
    batches, joined = int(delivery[1]), int(delivery[2])
    if inflight == "true":
        assert joined > 0, log[-3000:]
    else:
        assert batches > 1 and joined == 0, log[-3000:]
