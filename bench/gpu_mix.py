"""A realistic mix through the GPU worker's own parts, with the host's preparation of the next
batch done before (prefetch off) or during (prefetch on) the current batch's generation.

Jobs have 16-300 new tokens, drawn with a fixed seed; their videos come from a small pool, so
videos repeat (as follow-up questions and popular clips do), each sampled to its own 1-12 frames
(the same every time it is asked about, as the same sampling of a stored video gives); the prompts
of a batch differ in length, so rows are padded. Frames are PNGs in a local storage directory, fetched on a
thread pool, decoded, rendered and encoded by the worker's functions (``decode_png``,
``encode_prompt``: uint8 tensors, pinned on CUDA), and each batch goes through ``run_batch``.
No token ends a row early (eos is past the vocabulary), so each job generates exactly its tokens.

Printed per mode: jobs/s, new tokens/s, the device's host wait (seconds between generate calls,
and before the first, when the model had nothing to run because the host was still preparing),
time to first token (from the start, as for jobs all queued then: median and p95), prefix reuse,
and how many batched answers equal the job's solo answer. A third run takes the worker's default
path: jobs prepared on a thread (prefetch on) join the in-flight loop as rows free up
(``run_inflight``), with a prefix cache; its prefix reuse is the share of prompt tokens served from
that cache, and its hits over visual prefixes looked up (the static runs have no cache: n/a).
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
from worker.gpu.batch import BatchItem, Outcome, run_batch
from worker.gpu.inflight import run_inflight
from worker.gpu.model import LoadedModel, Prompt, encode_prompt, generate_one_call, memory_info
from worker.gpu.prefetch import with_own_processor
from worker.gpu.prefix_cache import PrefixCache, default_prefix_cache_bytes
from worker.gpu.token_stream import TokenStream
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
    sampled = [int(rng.integers(frames[0], frames[1] + 1)) for _ in range(videos)]  # a video's frame count
    mix = []
    for _ in range(count):
        video = int(rng.integers(videos))
        tokens = int(rng.integers(new_tokens[0], new_tokens[1] + 1))
        mix.append(MixJob(video, sampled[video], tokens, QUESTIONS[int(rng.integers(len(QUESTIONS)))]))
    return mix


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
    text = loaded.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
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

        def generate(model: LoadedModel, rows: list[Prompt], calls: list[Any] = calls, **kwargs: Any) -> list[Any]:
            calls.append(first_token(loaded, kwargs.pop("watch")))
            return generate_one_call(model, rows, watch=calls[-1], **kwargs)

        begun = time.perf_counter()
        wait += begun - idle_since
        outcomes = run_batch(
            loaded, [BatchItem(str(n), p) for n, p in zip(group, prompts, strict=True)], generate_fn=generate
        )
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


@dataclass
class PrefixReuse:
    cached_tokens: int
    prompt_tokens: int
    hits: int
    lookups: int

    def __str__(self) -> str:
        share = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return f"{share:.0%} {self.hits}/{self.lookups}"


class _FirstTokens(TokenStream):
    """Notes when each job's first new token exists; publishes nothing."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded.processor.tokenizer, loaded.eos_token_ids, lambda texts: None)
        self.at: dict[str, float] = {}

    def step(self, new_tokens: dict[str, int]) -> None:
        now = time.perf_counter()
        for key in new_tokens:
            self.at.setdefault(key, now)

    def finish(self, key: str, answer: str) -> None:
        pass


def run_inflight_mix(
    loaded: LoadedModel, store: ObjectStore, jobs: list[MixJob], rows: int
) -> tuple[MixRun, PrefixReuse]:
    """The jobs in order through the in-flight loop with a prefix cache, as the worker runs them:
    prepared on a thread and admitted between decode steps as rows free up. When nothing is
    running and the next job is still being prepared, the device waits (host wait)."""
    own = with_own_processor(loaded)
    fetch = ThreadPoolExecutor(8)
    ahead = ThreadPoolExecutor(1)
    prefixes = PrefixCache(default_prefix_cache_bytes(loaded.device, memory_info(loaded)[0]), loaded.model_id)
    stream = _FirstTokens(loaded)
    outcomes: dict[str, Outcome] = {}
    wait = 0.0
    _sync(loaded)
    started = time.perf_counter()
    prepared = [ahead.submit(prepare, own, store, job, fetch) for job in jobs]
    following = 0

    def admit(free_rows: int) -> list[BatchItem]:
        nonlocal following
        items: list[BatchItem] = []
        while len(items) < free_rows and following < len(jobs) and prepared[following].done():
            items.append(BatchItem(str(following), prepared[following].result()))
            following += 1
        return items

    while following < len(jobs):
        idle = time.perf_counter()
        first = BatchItem(str(following), prepared[following].result())
        following += 1
        wait += time.perf_counter() - idle
        outcomes |= run_inflight(loaded, [first], admit=admit, max_rows=rows, tokens=stream, prefixes=prefixes)
        _sync(loaded)
    wall = time.perf_counter() - started
    fetch.shutdown()
    ahead.shutdown()
    completions = [outcomes[str(number)].completion for number in range(len(jobs))]
    assert all(completion is not None for completion in completions)
    tokens = [completion.token_ids for completion in completions if completion is not None]
    reuse = PrefixReuse(
        sum(completion.cached_tokens for completion in completions if completion is not None),
        sum(completion.prompt_tokens for completion in completions if completion is not None),
        prefixes.hits, prefixes.hits + prefixes.misses,
    )  # fmt: skip
    ttft = [stream.at.get(str(number), started + wall) - started for number in range(len(jobs))]
    return MixRun(len(jobs) / wall, sum(len(t) for t in tokens) / wall, wait, wall, ttft, tokens), reuse


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
    run_mix(
        loaded, store, make_mix(2, videos=videos, new_tokens=(2, 2), seed=1), 2, prefetch=False, first_token=first_token
    )
    print(f"{'prefetch':<9} {'jobs/s':>7} {'tokens/s':>9} {'host wait s':>11} {'of wall':>7} "
          f"{'TTFT p50 s':>10} {'TTFT p95 s':>10} {'prefix reuse':>12} = solo")  # fmt: skip
    runs = {}
    solo_answers = solo_tokens(loaded, store, jobs[:solo]) if solo else []
    for prefetch in (False, True):
        run = runs[prefetch] = run_mix(loaded, store, jobs, batch, prefetch=prefetch, first_token=first_token)
        agreement = same_as_solo(solo_answers, run.tokens[:solo]) if prefetch and solo else ""
        print(f"{'on' if prefetch else 'off':<9} {run.jobs_per_s:>7.3f} {run.tokens_per_s:>9.1f} {run.host_wait_s:>11.3f} "
              f"{run.host_wait_s / run.wall_s:>7.1%} {np.percentile(run.ttft_s, 50):>10.2f} "
              f"{np.percentile(run.ttft_s, 95):>10.2f} {'n/a':>12} {agreement}", flush=True)  # fmt: skip
    inflight, reuse = run_inflight_mix(loaded, store, jobs, batch)
    agreement = same_as_solo(solo_answers, inflight.tokens[:solo]) if solo else ""
    print(f"{'in flight':<9} {inflight.jobs_per_s:>7.3f} {inflight.tokens_per_s:>9.1f} {inflight.host_wait_s:>11.3f} "
          f"{inflight.host_wait_s / inflight.wall_s:>7.1%} {np.percentile(inflight.ttft_s, 50):>10.2f} "
          f"{np.percentile(inflight.ttft_s, 95):>10.2f} {reuse!s:>12} {agreement}", flush=True)  # fmt: skip
    print(f"prefetch on / off: {runs[True].jobs_per_s / runs[False].jobs_per_s:.2f}x jobs/s; in flight / "
          f"prefetch on: {inflight.jobs_per_s / runs[True].jobs_per_s:.2f}x; prefix reuse: {reuse.cached_tokens} "
          f"of {reuse.prompt_tokens} prompt tokens from the cache, {reuse.hits} hits of {reuse.lookups} visual "
          f"prefixes looked up; batched answers compared with solo ones for the first {solo} jobs")  # fmt: skip
