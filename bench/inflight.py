"""In-flight batching and the prefix cache against the static batch, measured in the same run.

    python -m bench.inflight           # CUDA: the real architecture with random fp16 weights
                                       # no CUDA: the tiny model on the CPU, one thread (it says so)

The model is built as ``bench.gpu`` builds it (eos set past the vocabulary, so every job
generates exactly its ``max_new_tokens``). Each figure is the median of ``--repeat`` runs.

(a) A short job arrives during a long batch: 4 long jobs (2 frames, 96 new tokens) are
    generating when, after 16 decode steps, a short one (1 frame, 8 new tokens) arrives. Its
    latency, from arrival to its last token: static (``worker.gpu.batch.run_batch``: it waits
    for the whole batch, then runs alone) against in flight (``worker.gpu.inflight``: it joins at
    the next step boundary). Target: at least 3x sooner.
(b) A second question over the same 12 frames, after a first one: the prompt tokens it computes
    and its time to answer (8 new tokens), with the prefix cache against without. Targets: at
    least 90% fewer prompt tokens, at least 2x sooner.
(c) A mixed workload, all queued at once: 24 jobs of 1, 2 or 4 frames and 4, 16 or 64 new tokens,
    8 rows at a time: static batches of 8 one after the other against one in-flight run (no
    prefix cache, so this is the loop alone). Jobs per second.

"= static" counts the in-flight answers equal to the static path's (which tests check equal to
each job's solo answer on the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.gpu import build
from common.schemas import Generation
from worker.gpu.batch import BatchItem, Outcome, run_batch
from worker.gpu.inflight import run_inflight
from worker.gpu.model import LoadedModel, Prompt, encode_prompt, generate_one_call
from worker.gpu.prefix_cache import PrefixCache

ARRIVE_AFTER_STEPS = 16
ROWS = 8


def _sync(loaded: LoadedModel) -> None:
    if loaded.device == "cuda":
        torch.cuda.synchronize()


def job(
    loaded: LoadedModel, key: str, frames: int, seed: int, new_tokens: int, question: str = "What happens?"
) -> BatchItem:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)) for _ in range(frames)]
    content = [{"type": "image"}] * frames + [{"type": "text", "text": question}]
    text = loaded.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    prompt = Prompt(text=text, images=images, generation=Generation(max_new_tokens=new_tokens))
    return BatchItem(key, replace(prompt, encoded=encode_prompt(loaded, prompt)))


def _tokens(outcomes: dict[str, Outcome]) -> dict[str, list[int]]:
    return {key: outcome.completion.token_ids for key, outcome in outcomes.items() if outcome.completion}


class _StepClock:
    """The static path's stopping criterion, wrapped to note when decode step ``at`` happens."""

    def __init__(self, inner: Any, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0
        self.time: float | None = None

    def bind(self, prompt_length: int, prompt_tokens: list[int]) -> None:
        self.inner.bind(prompt_length, prompt_tokens)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.at + 1:  # the criterion also runs after the prefill's token
            self.time = time.perf_counter()
        return self.inner(input_ids, scores, **kwargs)


def short_job_latency(loaded: LoadedModel) -> tuple[float, float, bool]:
    """(a): seconds from arrival to the short job's answer, static and in flight."""
    long_jobs = [job(loaded, f"long{i}", 2, 100 + i, 96) for i in range(4)]
    short = job(loaded, "short", 1, 200, 8)
    clocks: list[_StepClock] = []

    def generate(model: LoadedModel, prompts: list[Prompt], *, watch: Any = None) -> list[Any]:
        clocks.append(_StepClock(watch, ARRIVE_AFTER_STEPS))
        return generate_one_call(model, prompts, watch=clocks[-1])

    static = run_batch(loaded, long_jobs, generate_fn=generate)
    arrived = clocks[0].time
    assert arrived is not None
    static_short = run_batch(loaded, [short])
    _sync(loaded)
    static_s = time.perf_counter() - arrived

    calls = 0
    arrival: list[float] = []
    done: dict[str, float] = {}

    def admit(free_rows: int) -> list[BatchItem]:
        nonlocal calls
        calls += 1
        if calls == ARRIVE_AFTER_STEPS + 1:  # the first call comes before the first step
            arrival.append(time.perf_counter())
            return [short]
        return []

    def ended(outcome: Outcome) -> None:
        _sync(loaded)
        done[outcome.key] = time.perf_counter()

    inflight = run_inflight(loaded, long_jobs, admit=admit, max_rows=ROWS, on_outcome=ended)
    same = _tokens(inflight) == {**_tokens(static), **_tokens(static_short)}
    return static_s, done["short"] - arrival[0], same


def second_question(loaded: LoadedModel) -> tuple[int, int, float, float, bool]:
    """(b): prompt tokens computed and seconds to answer, with the prefix cache and without."""
    first = job(loaded, "first", 12, 300, 8, "What is happening in this video?")
    second = job(loaded, "second", 12, 300, 8, "How many people are walking in the street?")
    prefixes = PrefixCache(8 * 2**30, loaded.model_id)
    run_inflight(loaded, [first], prefixes=prefixes)

    def answer(cache: PrefixCache | None) -> tuple[Outcome, float]:
        _sync(loaded)
        started = time.perf_counter()
        outcome = run_inflight(loaded, [second], prefixes=cache)["second"]
        _sync(loaded)
        return outcome, time.perf_counter() - started

    cached, cached_s = answer(prefixes)
    plain, plain_s = answer(None)
    assert cached.completion is not None and plain.completion is not None
    computed = cached.completion.prompt_tokens - cached.completion.cached_tokens
    same = cached.completion.token_ids == plain.completion.token_ids
    return plain.completion.prompt_tokens, computed, plain_s, cached_s, same


def mixed_workload(loaded: LoadedModel) -> tuple[float, float, bool]:
    """(c): jobs per second, static batches of ROWS against one in-flight run."""
    rng = np.random.default_rng(7)
    jobs = [
        job(loaded, f"job{i}", int(rng.choice([1, 2, 4])), 400 + i, int(rng.choice([4, 16, 64])), f"question {i}?")
        for i in range(24)
    ]
    _sync(loaded)
    started = time.perf_counter()
    static: dict[str, Outcome] = {}
    for start in range(0, len(jobs), ROWS):
        static.update(run_batch(loaded, jobs[start : start + ROWS]))
    _sync(loaded)
    static_s = time.perf_counter() - started
    started = time.perf_counter()
    inflight = run_inflight(loaded, jobs, max_rows=ROWS)
    _sync(loaded)
    inflight_s = time.perf_counter() - started
    return len(jobs) / static_s, len(jobs) / inflight_s, _tokens(inflight) == _tokens(static)


def _median(runs: list[tuple[Any, ...]], index: int) -> float:
    return statistics.median(run[index] for run in runs)


def _repeat(
    measure: Callable[[LoadedModel], tuple[Any, ...]], loaded: LoadedModel, times: int
) -> list[tuple[Any, ...]]:
    return [measure(loaded) for _ in range(times)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is printed)")
    args = parser.parse_args()
    from worker.fixtures.tiny_model import build_tiny_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
        print("no CUDA device: the tiny random-weight model on the CPU (1 thread)")
    with tempfile.TemporaryDirectory(prefix="videoqa-bench-") as tmp:
        loaded = build(device, build_tiny_model(Path(tmp) / "tiny"), "sdpa")
        print(f"model: {loaded.model_id} ({loaded.dtype}, {loaded.device}); median of {args.repeat} runs")
        run_inflight(loaded, [job(loaded, "warm", 1, 0, 2)])  # first-call costs out of the figures

        runs = _repeat(short_job_latency, loaded, args.repeat)
        static_s, inflight_s = _median(runs, 0), _median(runs, 1)
        print(
            f"(a) short job arriving during a long batch: static {static_s:.3f} s, in flight {inflight_s:.3f} s: "
            f"{static_s / inflight_s:.1f}x sooner (target 3x); = static {sum(run[2] for run in runs)}/{len(runs)}"
        )
        runs = _repeat(second_question, loaded, args.repeat)
        prompt, computed = runs[0][0], runs[0][1]
        plain_s, cached_s = _median(runs, 2), _median(runs, 3)
        print(
            f"(b) second question over the same 12 frames: {computed} of {prompt} prompt tokens computed "
            f"({1 - computed / prompt:.1%} fewer, target 90%); {plain_s:.3f} s without the prefix cache, "
            f"{cached_s:.3f} s with it: {plain_s / cached_s:.1f}x sooner (target 2x); "
            f"same answer {sum(run[4] for run in runs)}/{len(runs)}"
        )
        runs = _repeat(mixed_workload, loaded, args.repeat)
        static_rate, inflight_rate = _median(runs, 0), _median(runs, 1)
        print(
            f"(c) mixed workload, 24 jobs, {ROWS} rows: static {static_rate:.2f} jobs/s, in flight "
            f"{inflight_rate:.2f} jobs/s: {inflight_rate / static_rate:.2f}x; = static {sum(run[2] for run in runs)}/{len(runs)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
