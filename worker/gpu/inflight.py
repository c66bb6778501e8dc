"""In-flight batching: a decode loop whose rows join and leave at step boundaries.

``run_inflight`` takes jobs keyed by job id, like ``worker.gpu.batch.run_batch``, and gives each an
``Outcome`` the moment it is known. Unlike one ``generate`` call over a fixed batch:

* Before each decode step, free rows (``max_rows`` minus those generating) are filled: first from
  the jobs given or put back, then from ``admit(free_rows)``, a non-blocking callback that returns
  further prepared ``BatchItem``s (none: nothing is waiting). A joining job is prefilled alone,
  from a cached visual prefix when there is one (worker.gpu.prefix_cache), and its cache rows are
  merged into the running batch (worker.gpu.kv_rows).
* A row leaves as soon as it is done (its own ``max_new_tokens``, an eos token, a cancel, its
  deadline) and its cache rows are dropped, so later steps do not spend work on it and its slot
  is free for the next job.
* Each row has its own sampling settings (greedy, or temperature, top-k and top-p), so jobs with
  different settings share a batch.
* The per-step duties of the old monitor stay: each step's new token of every row goes to the
  ``TokenStream``; about every ``check_every_s`` the loop asks ``cancelled`` about its jobs and
  ends those past their deadline (an item's own ``deadline``, else the run's).
* Out of memory during a decode step puts the most recently joined half of the rows back at the
  head of the waiting jobs (they start again from their prompt: greedy rows repeat their tokens,
  and the token stream does not send them twice) and lowers the number of rows for the rest of the
  run. Out of memory while prefilling a job waits for the batch to drain; a job that does not fit
  alone ends with ``resource_exhausted``.

Every row's greedy tokens are the tokens a solo ``generate`` gives the job (fp32; see kv_rows).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from common.errors import ResourceExhausted
from common.schemas import Generation
from worker.gpu.batch import (
    CHECK_EVERY_S,
    CPU_BATCH_SIZE,
    BatchItem,
    Outcome,
    OutcomeSink,
    _is_out_of_memory,
    _release_cached_memory,
    _timeout,
)
from worker.gpu.kv_rows import Forward, RunningRows, model_forward, prefill
from worker.gpu.model import LoadedModel, completion_from_tokens, encode_prompt, memory_info
from worker.gpu.prefix_cache import PrefixCache
from worker.gpu.token_stream import TokenStream

log = logging.getLogger(__name__)

Admit = Callable[[int], list[BatchItem]]


@dataclass
class _Row:
    item: BatchItem
    tokens: list[int]
    position: int  # position id of the row's next token fed to the model: tokens in its cache
    prompt_tokens: int
    cached_tokens: int


def run_inflight(
    loaded: LoadedModel,
    items: list[BatchItem],
    *,
    admit: Admit | None = None,
    max_rows: int = CPU_BATCH_SIZE,
    on_outcome: Callable[[Outcome], None] | None = None,
    cancelled: Callable[[list[str]], set[str]] | None = None,
    deadline: float | None = None,
    check_every_s: float = CHECK_EVERY_S,
    tokens: TokenStream | None = None,
    prefixes: PrefixCache | None = None,
    forward: Forward | None = None,
) -> dict[str, Outcome]:
    """Generate every item's answer, and those ``admit`` hands over while rows are free; see the
    module docstring. ``forward`` is the one place that runs the model (tests wrap it)."""
    import torch

    loop = InflightLoop(
        loaded, forward or model_forward(loaded), admit=admit, max_rows=max_rows, on_outcome=on_outcome,
        cancelled=cancelled, deadline=deadline, check_every_s=check_every_s, tokens=tokens, prefixes=prefixes,
    )  # fmt: skip
    with torch.inference_mode():
        loop.run(items)
    return loop.outcomes


class InflightLoop(OutcomeSink):
    def __init__(
        self,
        loaded: LoadedModel,
        forward: Forward,
        *,
        admit: Admit | None,
        max_rows: int,
        on_outcome: Callable[[Outcome], None] | None,
        cancelled: Callable[[list[str]], set[str]] | None,
        deadline: float | None,
        check_every_s: float,
        tokens: TokenStream | None,
        prefixes: PrefixCache | None,
    ) -> None:
        self.loaded = loaded
        self.forward = forward
        self.admit = admit
        self.max_rows = max(1, max_rows)
        self.on_outcome = on_outcome
        self.cancelled = cancelled
        self.deadline = deadline
        self.check_every_s = check_every_s
        self.tokens = tokens
        self.prefixes = prefixes
        self.outcomes = {}
        self.waiting: deque[BatchItem] = deque()
        self.rows: list[_Row] = []
        self.kv = RunningRows(forward)
        self.steps = 0
        self.next_check = 0.0

    # -- the loop

    def run(self, items: list[BatchItem]) -> None:
        self.waiting.extend(items)
        while True:
            self.fill()
            if not self.rows:
                if not self.waiting:
                    return
                continue  # every job started ended at once (one token, or cancelled)
            self.decode()
            self.check_if_due()

    def fill(self) -> None:
        """Start waiting and admitted jobs while rows are free."""
        free = self.max_rows - len(self.rows) - len(self.waiting)
        if free > 0 and self.admit is not None:
            self.waiting.extend(self.admit(free))
        starting: list[BatchItem] = []
        while self.waiting and len(self.rows) + len(starting) < self.max_rows:
            item = self.waiting.popleft()
            if item.key not in self.outcomes and all(item.key != other.key for other in starting):
                starting.append(item)
        if not starting:
            return
        cancelled = self.cancelled_among([item.key for item in starting])
        for position, item in enumerate(starting):
            if item.key in cancelled:
                self.stop(item.key, cancelled=True)
            elif self.past(item):
                self.stop(item.key, error=_timeout())
            elif not self.start(item):
                # No room for it next to the running rows: it and the rest wait for rows to leave.
                self.waiting.extendleft(reversed(starting[position:]))
                return

    def start(self, item: BatchItem) -> bool:
        """Prefill ``item`` and take its row in; False when that ran out of memory beside others."""
        encoded = item.prompt.encoded or encode_prompt(self.loaded, item.prompt)
        prefilled = None
        try:
            prefilled = prefill(self.loaded, encoded, self.forward, self.prefixes)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
        # Out of memory: handled outside the except block, whose traceback would keep the failed
        # call's tensors alive and the memory they hold unreleasable.
        if prefilled is None:
            _release_cached_memory(self.loaded)
            if self.rows:
                log.warning("out of memory starting job %s beside %d others; it waits", item.key, len(self.rows))
                self.max_rows = len(self.rows)
                return False
            self.does_not_fit(item)
            return True
        if self.tokens is not None:
            self.tokens.restart([item.key])
        row = _Row(item, [], prefilled.prompt_tokens, prefilled.prompt_tokens, prefilled.cached_tokens)
        (token,) = choose_tokens(self.loaded, prefilled.logits, [item.prompt.generation])
        if self.tokens is not None:
            self.tokens.step({item.key: token})
        if self.extend(row, token):
            return True
        joined = False
        try:
            self.kv.join(prefilled)
            joined = True
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
        if not joined:
            # Only a batch that already runs can be too full to merge into (a first row is not
            # copied): the job starts again once rows have left.
            del prefilled
            _release_cached_memory(self.loaded)
            log.warning("out of memory adding job %s to %d others; it waits", item.key, len(self.rows))
            self.max_rows = len(self.rows)
            return False
        self.rows.append(row)
        return True

    def decode(self) -> None:
        """One step of every row; rows that are done leave."""
        logits = None
        try:
            logits = self.kv.step([row.tokens[-1] for row in self.rows], [row.position for row in self.rows])
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
        if logits is None:
            self.out_of_memory()
            return
        self.steps += 1
        chosen = choose_tokens(self.loaded, logits, [row.item.prompt.generation for row in self.rows])
        if self.tokens is not None:
            self.tokens.step({row.item.key: token for row, token in zip(self.rows, chosen, strict=True)})
        staying = []
        for index, (row, token) in enumerate(zip(self.rows, chosen, strict=True)):
            row.position += 1
            if not self.extend(row, token):
                staying.append(index)
        self.keep(staying)

    def extend(self, row: _Row, token: int) -> bool:
        """Add the row's new token; True when that finished the row (its answer is handed over)."""
        row.tokens.append(token)
        limit = row.item.prompt.generation.max_new_tokens
        if len(row.tokens) < limit and token not in self.loaded.eos_token_ids:
            return False
        completion = completion_from_tokens(self.loaded, row.tokens, limit, row.prompt_tokens)
        self.finish(row.item.key, replace(completion, cached_tokens=row.cached_tokens))
        return True

    def keep(self, indices: list[int]) -> None:
        self.rows = [self.rows[index] for index in indices]
        self.kv.keep(indices)

    def out_of_memory(self) -> None:
        _release_cached_memory(self.loaded)
        if len(self.rows) == 1:
            self.does_not_fit(self.rows[0].item)
            self.keep([])
            return
        half = len(self.rows) // 2
        back = self.rows[half:]
        log.warning("out of memory with %d rows; %d start again once rows are free", len(self.rows), len(back))
        self.max_rows = half
        self.keep(list(range(half)))
        self.waiting.extendleft(reversed([row.item for row in back]))

    def check_if_due(self) -> None:
        """Stop cancelled rows and rows past their deadline (about every ``check_every_s``)."""
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + self.check_every_s
        keys = [row.item.key for row in self.rows] + [item.key for item in self.waiting]
        cancelled = self.cancelled_among(keys)
        staying = []
        for index, row in enumerate(self.rows):
            key = row.item.key
            if key in cancelled:
                log.info("job %s cancelled after %d new tokens; its generation stops", key, len(row.tokens))
                self.stop(key, cancelled=True, tokens=len(row.tokens))
            elif self.past(row.item):
                self.stop(key, error=_timeout(), tokens=len(row.tokens))
            else:
                staying.append(index)
        self.keep(staying)
        for item in self.waiting:
            if item.key in cancelled:
                self.stop(item.key, cancelled=True)
            elif self.past(item):
                self.stop(item.key, error=_timeout())
        self.waiting = deque(item for item in self.waiting if item.key not in self.outcomes)

    # -- outcomes

    def settle(self, outcome: Outcome) -> None:
        outcome.step = self.steps
        super().settle(outcome)

    def does_not_fit(self, item: BatchItem) -> None:
        free, total = memory_info(self.loaded)
        log.warning("job %s does not fit alone (%.1f of %.1f GiB free)", item.key, free / 2**30, total / 2**30)
        self.stop(item.key, error=ResourceExhausted(
            f"the job does not fit in this worker's memory ({len(item.prompt.images)} images); "
            "ask for fewer frames or a shorter prompt"
        ))  # fmt: skip

    def cancelled_among(self, keys: list[str]) -> set[str]:
        return self.cancelled(keys) if self.cancelled is not None and keys else set()

    def past(self, item: BatchItem) -> bool:
        deadline = item.deadline if item.deadline is not None else self.deadline
        return deadline is not None and time.time() >= deadline


def choose_tokens(loaded: LoadedModel, logits: Any, generations: list[Generation]) -> list[int]:
    """Each row's next token: the most likely one, or a sample as ``generate`` draws it
    (temperature, the model's top-k, top-p) for rows that sample."""
    import torch

    chosen = logits.argmax(dim=-1)
    sampled = [row for row, generation in enumerate(generations) if generation.do_sample]
    if sampled:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        top_k = loaded.model.generation_config.top_k
        for row in sampled:
            generation = generations[row]
            scores = logits[row : row + 1].float()
            warpers: list[Any] = [TemperatureLogitsWarper(generation.temperature or 1.0)]
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if generation.top_p is not None and generation.top_p < 1.0:
                warpers.append(TopPLogitsWarper(generation.top_p))
            for warper in warpers:
                scores = warper(None, scores)
            chosen[row] = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[0, 0]
    return [int(token) for token in chosen.tolist()]
