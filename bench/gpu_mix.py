"""A realistic mix through the GPU worker's own parts, with the host's preparation of the next
batch done before (prefetch off) or during (prefetch on) the current batch's generation.

Jobs have 1-12 frames and 16-300 new tokens, drawn with a fixed seed; their videos come from a
small pool, so videos repeat (as follow-up questions and popular clips do); the prompts of a batch
differ in length, so rows are padded. Frames are PNGs in a local storage directory, fetched on a
thread pool, decoded, rendered and encoded by the worker's functions (``decode_png``,
``encode_prompt``: uint8 tensors, pinned on CUDA), and each batch goes through ``run_batch``.
No token ends a row early (eos is past the vocabulary), so each job generates exactly its tokens.

Printed per mode: jobs/s, new tokens/s, the device's host wait (seconds between generate calls,
and before the first, when the model had nothing to run because the host was still preparing),
time to first token (from the start, as for jobs all queued then: median and p95), prefix reuse
(this worker has no prefix cache: n/a), and how many batched answers equal the job's solo answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.schemas import Generation
from common.settings import load_settings
from common.storage import ObjectStore, open_store
from worker.gpu.batch import BatchItem, run_batch
from worker.gpu.model import LoadedModel, Prompt, encode_prompt, generate_one_call
from worker.gpu.prefetch import with_own_processor
from worker.media.png import decode_png, encode_png

QUESTIONS = ("What happens here?", "Is the cat doing the same thing in every clip, and what does it do at the end?",
             "Describe the scene.", "How many animals are there, and what colour are they?")  # fmt: skip


@dataclass
class MixJob:
    video: int
    frames: int
    new_tokens: int
    question: str


@dataclass
class MixRun:
    jobs_per_s: float
    tokens_per_s: float
    host_wait_s: float
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)  # per job, in job order


def make_mix(count: int, *, videos: int, seed: int = 0, frames: tuple[int, int] = (1, 12),
             new_tokens: tuple[int, int] = (16, 300)) -> list[MixJob]:  # fmt: skip
    rng = np.random.default_rng(seed)
    return [
        MixJob(int(rng.integers(videos)), int(rng.integers(frames[0], frames[1] + 1)),
               int(rng.integers(new_tokens[0], new_tokens[1] + 1)), QUESTIONS[int(rng.integers(len(QUESTIONS)))])
        for _ in range(count)
    ]  # fmt: skip


def store_videos(directory: Path, videos: int, size: int, frames: int = 12, seed: int = 0) -> ObjectStore:
    """``videos`` clips of ``frames`` random frames at the model's size, as PNGs in local storage."""
    store = open_store(load_settings({"VIDEOQA_STORAGE_URL": str(directory)}))
    rng = np.random.default_rng(seed)
    for video in range(videos):
        for index in range(frames):
            image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            store.put_bytes(f"mix/{video}/{index:04d}.png", encode_png(image), content_type="image/png")
    return store


def prepare(loaded: LoadedModel, store: ObjectStore, job: MixJob, pool: ThreadPoolExecutor) -> Prompt:
    """What the worker does for a job before it joins a batch: fetch, decode, render, encode."""
    keys = [f"mix/{job.video}/{index:04d}.png" for index in range(job.frames)]
    images = list(pool.map(lambda key: decode_png(store.get_bytes(key)), keys))
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": job.question}]
    text = loaded.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    prompt = Prompt(text=text, images=images, generation=Generation(max_new_tokens=job.new_tokens))
    prompt.encoded = encode_prompt(loaded, prompt)
    return prompt


def _sync(loaded: LoadedModel) -> None:
    if loaded.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_mix(loaded: LoadedModel, store: ObjectStore, jobs: list[MixJob], batch: int, *, prefetch: bool,
            first_token: Callable[[LoadedModel, Any], Any]) -> MixRun:  # fmt: skip
    """The jobs in batches of ``batch``, in order; ``first_token(loaded, watch)`` wraps the
    worker's stopping criterion and notes when the first new token exists (``.at``)."""
    groups = [list(range(start, min(start + batch, len(jobs)))) for start in range(0, len(jobs), batch)]
    own = with_own_processor(loaded)  # the preparing thread's, as in the worker
    fetch = ThreadPoolExecutor(8)
    ahead = ThreadPoolExecutor(1)
    tokens: dict[int, list[int]] = {}
    ttft: dict[int, float] = {}
    wait = 0.0

    def prepare_group(group: list[int]) -> list[Prompt]:
        return [prepare(own, store, jobs[number], fetch) for number in group]

    _sync(loaded)
    started = time.perf_counter()
    idle_since = started
    pending: Future[list[Prompt]] | None = ahead.submit(prepare_group, groups[0]) if prefetch else None
    for position, group in enumerate(groups):
        prompts = pending.result() if pending is not None else prepare_group(group)
        pending = ahead.submit(prepare_group, groups[position + 1]) if prefetch and position + 1 < len(groups) else None
        calls: list[Any] = []

        def generate(model: LoadedModel, rows: list[Prompt], **kwargs: Any) -> list[Any]:
            calls.append(first_token(loaded, kwargs.pop("watch")))
            return generate_one_call(model, rows, watch=calls[-1], **kwargs)

        begun = time.perf_counter()
        wait += begun - idle_since
        outcomes = run_batch(loaded, [BatchItem(str(n), p) for n, p in zip(group, prompts, strict=True)], generate_fn=generate)
        _sync(loaded)
        idle_since = time.perf_counter()
        for number in group:
            completion = outcomes[str(number)].completion
            assert completion is not None
            tokens[number] = completion.token_ids
            ttft[number] = (calls[0].at or idle_since) - started
    wall = time.perf_counter() - started
    fetch.shutdown()
    ahead.shutdown()
    total = sum(len(t) for t in tokens.values())
    return MixRun(len(jobs) / wall, total / wall, wait, wall, [ttft[n] for n in range(len(jobs))],
                  [tokens[n] for n in range(len(jobs))])  # fmt: skip


def solo_tokens(loaded: LoadedModel, store: ObjectStore, jobs: list[MixJob]) -> list[list[int]]:
    with ThreadPoolExecutor(8) as pool:
        return [generate_one_call(loaded, [prepare(loaded, store, job, pool)])[0].token_ids for job in jobs]


def describe_mix(jobs: list[MixJob]) -> str:
    frames = [job.frames for job in jobs]
    tokens = [job.new_tokens for job in jobs]
    distinct = len({job.video for job in jobs})
    return (f"{len(jobs)} jobs: {min(frames)}-{max(frames)} frames (mean {np.mean(frames):.1f}), "
            f"{min(tokens)}-{max(tokens)} new tokens (mean {np.mean(tokens):.0f}), {distinct} distinct videos")  # fmt: skip


def print_mix(loaded: LoadedModel, workdir: Path, *, count: int, batch: int, videos: int, solo: int,
              first_token: Callable[[LoadedModel, Any], Any], same_as_solo: Callable[[list[list[int]], list[list[int]]], str]) -> None:  # fmt: skip
    size = loaded.normalisation.height if loaded.normalisation is not None else 384
    store = store_videos(workdir / "mix-store", videos, size)
    jobs = make_mix(count, videos=videos)
    print(f"mix: {describe_mix(jobs)}; batches of {batch}")
    # First calls pay for kernel selection and allocator growth (and compilation, when asked).
    run_mix(loaded, store, make_mix(2, videos=videos, new_tokens=(2, 2), seed=1), 2, prefetch=False, first_token=first_token)
    print(f"{'prefetch':<9} {'jobs/s':>7} {'tokens/s':>9} {'host wait s':>11} {'of wall':>7} "
          f"{'TTFT p50 s':>10} {'TTFT p95 s':>10} {'prefix reuse':>12} = solo")  # fmt: skip
    runs = {}
    for prefetch in (False, True):
        run = runs[prefetch] = run_mix(loaded, store, jobs, batch, prefetch=prefetch, first_token=first_token)
        agreement = ""
        if prefetch and solo:
            agreement = same_as_solo(solo_tokens(loaded, store, jobs[:solo]), run.tokens[:solo])
        print(f"{'on' if prefetch else 'off':<9} {run.jobs_per_s:>7.3f} {run.tokens_per_s:>9.1f} {run.host_wait_s:>11.3f} "
              f"{run.host_wait_s / run.wall_s:>7.1%} {np.percentile(run.ttft_s, 50):>10.2f} "
              f"{np.percentile(run.ttft_s, 95):>10.2f} {'n/a':>12} {agreement}", flush=True)  # fmt: skip
    print(f"prefetch on / off: {runs[True].jobs_per_s / runs[False].jobs_per_s:.2f}x jobs/s; "
          f"batched answers compared with solo ones for the first {solo} jobs")  # fmt: skip
