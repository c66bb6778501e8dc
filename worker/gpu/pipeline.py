"""The generate task's body: the delivered job leads a batch (worker.gpu.claims), and, with
prefetch on, the batches after it come from jobs claimed and loaded while the one before generated
(worker.gpu.prefetch), so the model goes from batch to batch without waiting on the host.

The task keeps starting batches from prefetched jobs while there are some, until the worker is
asked to stop (a warm shutdown waits for the batch in hand only) or until ``budget_s`` has passed
since it started: every message it holds, its own included, must be settled before the broker's
visibility timeout hands it to another worker, and a batch may run for the time limit. With
in-flight batching the prefetched jobs also join the running batch as its rows free up
(``answer_jobs``'s ``admit``), within the same budget; a job's time limit starts when it joins. Then the
prefetched jobs not started go back to the queue, and Celery delivers the next leader.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from common.errors import TransientError
from worker.gpu.claims import Claim, GpuQueue
from worker.gpu.prefetch import Ahead, Prefetcher
from worker.gpu.stage import AnswerContext, LoadedJob, answer_jobs, load_job

log = logging.getLogger(__name__)

FailJob = Callable[[str, BaseException], None]


class Settler(Protocol):
    def done(self, claim: Claim) -> None: ...

    def fail(self, claim: Claim, exc: BaseException) -> None: ...

    def retry(self, claim: Claim, exc: TransientError, on_give_up: Callable[[Claim, TransientError], None]) -> None: ...


@dataclass
class Prefetching:
    """How the task pipelines batches; ``ahead_ctx`` loads jobs off the task's thread (a processor
    of its own: a tokenizer is not to be used by two threads at once)."""

    ahead_ctx: AnswerContext
    budget_s: float
    should_stop: Callable[[], bool]


@dataclass
class _Admission:
    """Prefetched jobs handed to a running in-flight batch as rows free up (``answer_jobs``'s
    ``admit``), until ``until`` (monotonic seconds) or a stop; kept to be settled after it."""

    prefetcher: Prefetcher
    until: float
    should_stop: Callable[[], bool]
    loaded: dict[str, LoadedJob]
    taken: list[Ahead] = field(default_factory=list)

    def __call__(self, free_rows: int) -> list[str]:
        if time.monotonic() >= self.until or self.should_stop():
            return []
        taken = self.prefetcher.take(free_rows)
        self.taken += taken
        # Read by answer_jobs as each admitted job starts (before this returns nothing is started).
        self.loaded.update({item.claim.job_id: item.loaded for item in taken if item.loaded is not None})
        return [item.claim.job_id for item in taken]


def _answer(
    job_ids: list[str], claims: list[Claim], settler: Settler, ctx: AnswerContext, fail_job: FailJob,
    ahead: dict[str, LoadedJob] | None = None, admission: _Admission | None = None,
) -> dict[str, TransientError]:  # fmt: skip
    """One batch (with ``admission``, the jobs it hands over too); each claim settled after its
    job's terminal write (or retried, or failed), by the settler that holds it."""
    held: list[tuple[Claim, Settler]] = [(claim, settler) for claim in claims]
    loaded = ahead if ahead is not None else {}
    if admission is not None:
        admission.loaded = loaded
    try:
        retry = answer_jobs(job_ids, ctx, loaded, admit=admission)
    except Exception as exc:
        if admission is not None:
            held += [(item.claim, admission.prefetcher) for item in admission.taken]
        for claim, holder in held:
            fail_job(claim.job_id, exc)
            holder.fail(claim, exc)
        raise
    if admission is not None:
        held += [(item.claim, admission.prefetcher) for item in admission.taken]
    for claim, holder in held:
        if claim.job_id in retry:
            holder.retry(claim, retry[claim.job_id], on_give_up=lambda c, e: fail_job(c.job_id, e))
        else:
            holder.done(claim)
    return retry


def _ended(loaded: LoadedJob) -> bool:
    """A job found ended when it is loaded ahead needs nothing (its message is acknowledged at
    once); said as the stage says it of a message it needs not run."""
    if loaded.job is None or not loaded.job.status.terminal:
        return False
    log.info("generate: job %s is %s; nothing to do", loaded.job_id, loaded.job.status)
    return True


def answer_claimed_batch(
    job_id: str,
    *,
    gpu_queue: GpuQueue,
    ctx: AnswerContext,
    batch_size: int,
    wait_s: float,
    fail_job: FailJob,
    prefetching: Prefetching | None = None,
) -> None:
    """``job_id`` (the delivered message) plus what the queue offers, then (with ``prefetching``)
    the batches prefetched meanwhile.

    A transient error of the leader propagates, so Celery retries it; a bug fails every job of
    the batch, then propagates for the leader."""
    if prefetching is None:
        with gpu_queue.claim(batch_size - 1, wait_s, exclude=job_id) as claims:
            retry = _answer([job_id, *(c.job_id for c in claims)], claims, gpu_queue, ctx, fail_job)
        if job_id in retry:
            raise retry[job_id]
        return
    began = time.monotonic()
    ahead_ctx = prefetching.ahead_ctx
    prefetcher = Prefetcher(
        gpu_queue,
        lambda queued: load_job(queued, ahead_ctx),
        capacity=batch_size,
        needs_nothing=_ended,
    )
    joined = 0
    with prefetcher:
        until = began + prefetching.budget_s

        def admission() -> _Admission | None:
            # In flight, prefetched jobs join the running batch as its rows free up.
            return _Admission(prefetcher, until, prefetching.should_stop, {}) if ctx.inflight else None

        with gpu_queue.claim(batch_size - 1, wait_s, exclude=job_id) as claims:
            prefetcher.start()  # after the leader's batch is claimed: the next batch's jobs are the rest
            admitted = admission()
            retry = _answer([job_id, *(c.job_id for c in claims)], claims, gpu_queue, ctx, fail_job, admission=admitted)
            joined += len(admitted.taken) if admitted is not None else 0
        if job_id in retry:
            raise retry[job_id]
        batches = 1
        while not prefetching.should_stop() and time.monotonic() - began < prefetching.budget_s:
            taken: list[Ahead] = prefetcher.take_waiting(batch_size, wait_s)
            if not taken:
                break
            ids = [item.claim.job_id for item in taken]
            loaded = {item.claim.job_id: item.loaded for item in taken if item.loaded is not None}
            admitted = admission()
            _answer(ids, [item.claim for item in taken], prefetcher, ctx, fail_job, loaded, admitted)
            joined += len(admitted.taken) if admitted is not None else 0
            batches += 1
        if batches > 1 or joined:
            log.info(
                "ran %d batches in %.1f s from one delivery, %d prefetched jobs joining running ones",
                batches, time.monotonic() - began, joined,
            )  # fmt: skip
