"""Several jobs through the model at once: grouping, ordering, watching rows, out-of-memory splits.

``run_batch`` takes prompts keyed by job id and gives each an ``Outcome``, handed to
``on_outcome`` the moment it is known:

* Prompts with the same generation settings share one ``generate`` call (left padding, attention
  mask, pad token: greedy rows get exactly their unbatched tokens), in order of prompt length so
  that the halves of a split hold prompts of similar length.
* A ``BatchMonitor`` rides along as a stopping criterion. On the device, every step, it ends each
  row at its own ``max_new_tokens`` and ends rows it was told to stop; about every 100 ms it reads
  the tokens back to hand each finished row over without waiting for the rest of the batch, asks
  ``cancelled`` which jobs were cancelled (their rows stop at the next step), and ends every row
  once the deadline passes. Reading the tokens only every ~100 ms keeps the host
  from waiting on the device at each step for this.
* With a ``TokenStream`` (worker.gpu.token_stream), the monitor also hands it each step's new token of
  every open row: one read of the last column, one publish for the whole batch. A row's remaining
  text is sent before its outcome, so a watcher sees every token before the job ends.
* A CUDA out-of-memory error splits the prompts still unfinished into halves and runs them one
  after the other; a single prompt that still does not fit ends with ``resource_exhausted``.
  ``generate_fn`` is the one place that touches the model, so the split is testable anywhere.

Rows that finished stay in the batch until its last row is done (the ``generate`` loop cannot drop
them), so a batch of very different ``max_new_tokens`` spends some steps on padding, and a job that
arrives meanwhile waits for the whole batch. The worker's default is the in-flight loop
(worker.gpu.inflight), where rows join and leave between steps; this static path is what
``VIDEOQA_INFLIGHT_BATCHING=false`` runs, and the benchmarks' baseline. The batch sizing below
serves both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from common.errors import ResourceExhausted, VideoQAError
from worker.gpu.model import (
    Completion,
    LoadedModel,
    Prompt,
    completion_from_tokens,
    generate_one_call,
    generation_key,
    memory_info,
)
from worker.gpu.token_stream import TokenStream

log = logging.getLogger(__name__)

GenerateFn = Callable[..., list[Completion]]
CHECK_EVERY_S = 0.1
# A batch on CPU is bounded by time, not memory: past a handful of rows the per-step overhead
# that batching saves is already small next to the work per row.
CPU_BATCH_SIZE = 8
MAX_BATCH_SIZE = 32


@dataclass
class BatchItem:
    key: str  # the job id
    prompt: Prompt
    # A ``time.time()`` past which the job ends with ``timeout``; None: the batch's own deadline.
    deadline: float | None = None


@dataclass
class Outcome:
    key: str
    completion: Completion | None = None
    error: VideoQAError | None = None
    cancelled: bool = False
    generated_tokens: int = 0  # new tokens the row had when it ended (also for cancelled rows)
    step: int | None = None  # the in-flight loop's decode steps so far when the job ended


def run_batch(
    loaded: LoadedModel,
    items: list[BatchItem],
    *,
    on_outcome: Callable[[Outcome], None] | None = None,
    cancelled: Callable[[list[str]], set[str]] | None = None,
    deadline: float | None = None,
    check_every_s: float = CHECK_EVERY_S,
    generate_fn: GenerateFn = generate_one_call,
    tokens: TokenStream | None = None,
) -> dict[str, Outcome]:
    """Generate every item's answer; see the module docstring. ``deadline`` is a ``time.time()``."""
    runner = _Runner(loaded, on_outcome, cancelled, deadline, check_every_s, generate_fn, tokens)
    groups: dict[tuple[Any, ...], list[BatchItem]] = {}
    for item in items:
        groups.setdefault(generation_key(item.prompt.generation), []).append(item)
    for group in groups.values():
        runner.run(sorted(group, key=_length_key))
    return runner.outcomes


def generate_batch(loaded: LoadedModel, prompts: list[Prompt]) -> list[Completion]:
    """``run_batch`` for callers that want the completions alone, in the order of ``prompts``;
    a prompt that ends without one raises its error."""
    outcomes = run_batch(loaded, [BatchItem(str(position), prompt) for position, prompt in enumerate(prompts)])
    completions = []
    for position in range(len(prompts)):
        outcome = outcomes[str(position)]
        if outcome.completion is None:
            raise outcome.error or VideoQAError("the prompt produced no completion", code="internal")
        completions.append(outcome.completion)
    return completions


def _length_key(item: BatchItem) -> tuple[int, int]:
    # Images dominate a prompt's length (hundreds of tokens each); text breaks ties.
    return (len(item.prompt.images), len(item.prompt.text))


class OutcomeSink:
    """Where a batch's rows end: each job's outcome recorded once, handed to ``on_outcome``, and
    its streamed text closed with the final answer. The static runner and the in-flight loop share it."""

    tokens: TokenStream | None
    on_outcome: Callable[[Outcome], None] | None
    outcomes: dict[str, Outcome]

    def settle(self, outcome: Outcome) -> None:
        self.outcomes[outcome.key] = outcome
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def finish(self, key: str, completion: Completion) -> None:
        if self.tokens is not None:
            self.tokens.finish(key, completion.text)
        self.settle(Outcome(key, completion=completion, generated_tokens=completion.completion_tokens))

    def stop(self, key: str, *, cancelled: bool = False, error: VideoQAError | None = None, tokens: int = 0) -> None:
        self.settle(Outcome(key, cancelled=cancelled, error=error, generated_tokens=tokens))


class _Runner(OutcomeSink):
    def __init__(
        self,
        loaded: LoadedModel,
        on_outcome: Callable[[Outcome], None] | None,
        cancelled: Callable[[list[str]], set[str]] | None,
        deadline: float | None,
        check_every_s: float,
        generate_fn: GenerateFn,
        tokens: TokenStream | None = None,
    ) -> None:
        self.loaded = loaded
        self.tokens = tokens
        self.on_outcome = on_outcome
        self.cancelled = cancelled
        self.deadline = deadline
        self.check_every_s = check_every_s
        self.generate_fn = generate_fn
        self.outcomes = {}

    def cancelled_among(self, keys: list[str]) -> set[str]:
        return self.cancelled(keys) if self.cancelled is not None and keys else set()

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def run(self, items: list[BatchItem]) -> None:
        items = [item for item in items if item.key not in self.outcomes]
        for key in self.cancelled_among([item.key for item in items]):
            self.stop(key, cancelled=True)
        if self.past_deadline():
            for item in items:
                if item.key not in self.outcomes:
                    self.stop(item.key, error=_timeout())
        items = [item for item in items if item.key not in self.outcomes]
        if not items:
            return
        monitor = BatchMonitor(self, items)
        completions = None
        try:
            completions = self.generate_fn(self.loaded, [item.prompt for item in items], watch=monitor)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
        # Out of memory: handled outside the except block, whose traceback would keep the failed
        # call's tensors alive and the memory they hold unreleasable.
        if completions is None:
            _release_cached_memory(self.loaded)
            unfinished = [item for item in items if item.key not in self.outcomes]
            if len(unfinished) <= 1:
                for item in unfinished:
                    free, total = memory_info(self.loaded)
                    log.warning(
                        "job %s does not fit alone (%.1f of %.1f GiB free)", item.key, free / 2**30, total / 2**30
                    )
                    self.stop(item.key, error=ResourceExhausted(
                        f"the job does not fit in this worker's memory ({len(item.prompt.images)} images); "
                        "ask for fewer frames or a shorter prompt"
                    ))  # fmt: skip
                return
            half = len(unfinished) // 2
            log.warning(
                "out of memory with %d jobs; retrying as %d + %d", len(unfinished), half, len(unfinished) - half
            )
            self.run(unfinished[:half])
            self.run(unfinished[half:])
            return
        for item, completion in zip(items, completions, strict=True):
            if item.key not in self.outcomes:
                self.finish(item.key, completion)


class BatchMonitor:
    """The stopping criterion of one ``generate`` call over ``items`` (row i is items[i]); a
    ``worker.gpu.model.GenerationWatch``."""

    def __init__(self, runner: _Runner, items: list[BatchItem]) -> None:
        self.runner = runner
        self.items = items
        self.prompt_length = 0
        self.prompt_tokens: list[int] = []
        self.limits: Any = None  # per-row max_new_tokens, on the device
        self.stopped: Any = None  # rows ended by a cancel or the deadline, on the device
        self.next_check = 0.0
        if runner.tokens is not None:
            runner.tokens.restart(item.key for item in items)

    def bind(self, prompt_length: int, prompt_tokens: list[int]) -> None:
        self.prompt_length = prompt_length
        self.prompt_tokens = prompt_tokens

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if self.limits is None:
            self.limits = torch.tensor(
                [item.prompt.generation.max_new_tokens for item in self.items], device=input_ids.device
            )
            self.stopped = torch.zeros(len(self.items), dtype=torch.bool, device=input_ids.device)
        generated = input_ids.shape[1] - self.prompt_length
        done = self.stopped | (self.limits <= generated)
        if self.runner.tokens is not None:
            self.stream(input_ids[:, -1].tolist(), generated)
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + self.runner.check_every_s
            self.check(input_ids)
            done = done | self.stopped
        return done

    def stream(self, last: list[int], generated: int) -> None:
        """Each open row's newest token to the token stream (rows past their own limit or ended
        produce padding)."""
        outcomes = self.runner.outcomes
        assert self.runner.tokens is not None
        self.runner.tokens.step({
            item.key: token
            for item, token in zip(self.items, last, strict=True)
            if item.key not in outcomes and generated <= item.prompt.generation.max_new_tokens
        })  # fmt: skip

    def check(self, input_ids: Any) -> None:
        """Hand over finished rows, stop cancelled ones, and all of them past the deadline."""
        rows: list[list[int]] = input_ids[:, self.prompt_length :].tolist()
        outcomes = self.runner.outcomes
        eos = self.runner.loaded.eos_token_ids
        open_rows = []
        for row, (item, tokens) in enumerate(zip(self.items, rows, strict=True)):
            if item.key in outcomes:
                continue
            limit = item.prompt.generation.max_new_tokens
            if len(tokens) >= limit or any(token in eos for token in tokens):
                completion = completion_from_tokens(self.runner.loaded, tokens, limit, self.prompt_tokens[row])
                self.runner.finish(item.key, completion)
            else:
                open_rows.append(row)
        if not open_rows:
            return
        cancelled = self.runner.cancelled_among([self.items[row].key for row in open_rows])
        timed_out = self.runner.past_deadline()
        ended = [row for row in open_rows if timed_out or self.items[row].key in cancelled]
        for row in ended:
            key = self.items[row].key
            if key in cancelled:
                log.info("job %s cancelled after %d new tokens; its generation stops", key, len(rows[row]))
                self.runner.stop(key, cancelled=True, tokens=len(rows[row]))
            else:
                self.runner.stop(key, error=_timeout(), tokens=len(rows[row]))
            self.stopped[row] = True


def _timeout() -> VideoQAError:
    return VideoQAError("the job ran past its time limit", code="timeout")


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _release_cached_memory(loaded: LoadedModel) -> None:
    if loaded.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def tokens_per_image(config: Any) -> int:
    vision = config.vision_config
    return int((vision.image_size // vision.patch_size) ** 2)


def kv_cache_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Keys and values of every layer for one token: 0.5 MiB on the real model in fp16."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return int(2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes)


def job_memory_bytes(
    config: Any, dtype_bytes: int, *, frames: int = 12, text_tokens: int = 32, new_tokens: int = 100
) -> int:
    """What one more row of a batch costs: its KV cache (~4.6 GB for 12 frames on the real model)
    plus the activations its prompt needs during prefill (hidden states and the MLP's widest
    layer, about 15% on top)."""
    text = config.text_config
    tokens = frames * tokens_per_image(config) + text_tokens + new_tokens
    activations = dtype_bytes * (4 * text.hidden_size + 2 * text.intermediate_size)
    return tokens * (kv_cache_bytes_per_token(config, dtype_bytes) + activations)


def default_batch_size(loaded: LoadedModel, *, reserve: float = 0.1, set_aside_bytes: int = 0) -> int:
    """How many 12-frame jobs fit next to the loaded model, keeping ``reserve`` of the GPU free
    for the allocator's fragmentation and the vision tower's activations, and ``set_aside_bytes``
    (the prefix cache's) for other uses."""
    if not loaded.device.startswith("cuda"):
        return CPU_BATCH_SIZE
    free, total = memory_info(loaded)
    dtype_bytes = loaded.model.dtype.itemsize
    per_job = job_memory_bytes(loaded.model.config, dtype_bytes)
    fits = int((free - set_aside_bytes - reserve * total) // per_job)
    return max(1, min(MAX_BATCH_SIZE, fits))


def describe(outcomes: Iterable[Outcome]) -> str:
    """``3 done, 1 cancelled`` for logs."""
    counts: dict[str, int] = {}
    for outcome in outcomes:
        state = "done" if outcome.completion else "cancelled" if outcome.cancelled else "failed"
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{count} {state}" for state, count in counts.items()) or "nothing"
