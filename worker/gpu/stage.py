"""The GPU stage of jobs: load their stored frames, generate them together (in-flight batching,
worker.gpu.inflight: jobs handed over by ``admit`` join while others generate), publish each
answer's text as it is generated (worker.gpu.token_stream), write each result once, as soon as that
job's answer is complete.

Everything done for one job alone (its frames, its prompt, the processor's work on it) happens
before the batch forms, so a job that fails there ends alone with its own error. That work
(``load_job``) writes nothing, so it can also be done ahead, while another batch generates
(worker.gpu.prefetch): what it met (an error included) is applied when the job starts.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any

import redis

from common.errors import TransientError, VideoQAError
from common.events import JobEvents
from common.handoff import Handoff
from common.jobs import Job, JobStatus, JobStore
from common.logging_config import job_context
from common.schemas import StoredRequest
from common.storage import ObjectStore
from worker.gpu.batch import CPU_BATCH_SIZE, BatchItem, Outcome, describe, run_batch
from worker.gpu.inflight import run_inflight
from worker.gpu.kv_rows import model_forward
from worker.gpu.model import Completion, LoadedModel, Prompt, encode_prompt, generate_one_call, render_prompt
from worker.gpu.prefix_cache import PrefixCache
from worker.gpu.token_stream import TokenStream
from worker.media.png import decode_png

log = logging.getLogger(__name__)

# Stored frames fetched and decoded at once for one job.
_LOAD_THREADS = 8


@dataclass
class AnswerContext:
    jobs: JobStore
    store: ObjectStore
    model: LoadedModel
    # Generation of a batch stops (jobs fail with ``timeout``) this many seconds after it starts.
    time_limit_s: float | None = None
    max_attempts: int = 3
    # Fetches and decodes frames (VIDEOQA_FETCH_THREADS); None: a pool of _LOAD_THREADS per job.
    fetch_pool: Executor | None = None
    # Seconds spent inside the model (generate calls, or the in-flight loop's forward passes) since
    # the worker started (host overhead is the rest of its busy time; bench/host_overhead.py reads
    # it from the log).
    model_seconds: float = 0.0
    # In-flight batching (else one generate call per batch), its most rows, the prefix cache.
    inflight: bool = True
    max_rows: int = CPU_BATCH_SIZE
    prefixes: PrefixCache | None = None


@dataclass
class LoadedJob:
    """A job's record and prompt, read ahead of its start; nothing written yet."""

    job_id: str
    job: Job | None = None
    prompt: Prompt | None = None
    handoff: Handoff | None = None
    load_seconds: float = 0.0
    error: Exception | None = None  # met while loading; raised when the job starts

    @property
    def runnable(self) -> bool:
        return self.job is not None and self.job.status in (JobStatus.QUEUED_GPU, JobStatus.GENERATING)


@dataclass
class _Prepared:
    job: Job
    prompt: Prompt
    handoff: Handoff
    load_seconds: float


def _load_prompt(job: Job, handoff: Handoff, ctx: AnswerContext) -> Prompt:
    request = StoredRequest.model_validate(job.request)
    # Every stored image of the job, fetched and decoded on threads: storage round trips overlap,
    # and Pillow inflates PNG without holding the GIL. The worker's pool when it has one.
    keys = [frame.key for video in handoff.videos for frame in video.frames]
    keys += [image.key for image in handoff.images]

    def fetch(key: str) -> Any:
        return decode_png(ctx.store.get_bytes(key))

    if ctx.fetch_pool is not None:
        loaded = dict(zip(keys, ctx.fetch_pool.map(fetch, keys), strict=True))
    else:
        with concurrent.futures.ThreadPoolExecutor(min(_LOAD_THREADS, max(1, len(keys))), "load-frame") as pool:
            loaded = dict(zip(keys, pool.map(fetch, keys), strict=True))
    video_frames = [[loaded[frame.key] for frame in video.frames] for video in handoff.videos]
    images = [loaded[image.key] for image in handoff.images]
    prompt = render_prompt(ctx.model.processor, request, video_frames, images)
    # Encoded here, per job: text or images the processor refuses fail this job, not its batch.
    return replace(prompt, encoded=encode_prompt(ctx.model, prompt))


TIMING_ORDER = ("queue_wait", "download", "decode", "store_frames", "ingest", "queue_gpu", "load_frames", "generate")


def _timings(job: Job, handoff: Handoff, now: float, extra: dict[str, float]) -> dict[str, float]:
    """Seconds per stage, in pipeline order, then the total from submission to result."""
    measured: dict[str, float] = {**handoff.ingest_timings, **job.stage_seconds(), **extra}
    if "start" in job.stages.get("ingest", {}):
        measured["queue_wait"] = job.stages["ingest"]["start"] - job.created_at
    timings = {name: round(measured[name], 4) for name in TIMING_ORDER if name in measured}
    timings["total"] = round(now - job.created_at, 4)
    return timings


def load_job(job_id: str, ctx: AnswerContext) -> LoadedJob:
    """Read the job and load its prompt, writing nothing: an error is kept for its start."""
    job = ctx.jobs.get(job_id)
    loaded = LoadedJob(job_id, job)
    if not loaded.runnable:
        return loaded
    assert job is not None
    started = time.perf_counter()
    try:
        loaded.handoff = Handoff.of(job)
        loaded.prompt = _load_prompt(job, loaded.handoff, ctx)
    except Exception as exc:  # noqa: BLE001 - applied when the job starts, as if met then
        loaded.error = exc
    loaded.load_seconds = time.perf_counter() - started
    return loaded


def _prepare(job_id: str, ctx: AnswerContext, ahead: LoadedJob | None = None) -> _Prepared | None:
    """Move the job to ``generating`` and load its prompt (or take what ``ahead`` loaded); None
    when there is nothing to generate (unknown, cancelled, ended, or failed here). Transient
    storage errors propagate."""
    jobs = ctx.jobs
    job = jobs.get(job_id)
    if job is None:
        log.warning("generate: job %s does not exist (expired?); dropped", job_id)
        return None
    if not jobs.transition(job_id, JobStatus.GENERATING, allowed_from={JobStatus.QUEUED_GPU, JobStatus.GENERATING}):
        log.info("generate: job %s is %s; nothing to do", job_id, job.status)
        return None
    if not jobs.begin_attempt(job_id, ctx.max_attempts):
        log.warning("generate: job %s failed as poison", job_id)
        return None
    if "end" not in job.stages.get("queue_gpu", {}):
        jobs.mark(job_id, "queue_gpu", "end")
    started = time.perf_counter()
    try:
        if ahead is not None and ahead.handoff is not None and (ahead.prompt is not None or ahead.error is not None):
            if ahead.error is not None:
                raise ahead.error
            assert ahead.prompt is not None
            prompt, handoff = ahead.prompt, ahead.handoff
            started -= ahead.load_seconds
        else:
            handoff = Handoff.of(job)
            prompt = _load_prompt(job, handoff, ctx)
    except TransientError:
        jobs.note_retry(job_id)
        raise
    except VideoQAError as exc:
        jobs.fail(job_id, exc.code, exc.message)
        return None
    except Exception:
        # One unreadable job must not take the rest of its batch down with it.
        log.exception("generate: job %s could not be prepared", job_id)
        jobs.fail(job_id, "internal", "internal error while preparing the job")
        return None
    return _Prepared(job=job, prompt=prompt, handoff=handoff, load_seconds=time.perf_counter() - started)


def _publish(prepared: _Prepared, completion: Completion, ctx: AnswerContext, batch_size: int) -> None:
    jobs = ctx.jobs
    job_id = prepared.job.id
    jobs.mark(job_id, "generate", "end")
    job = jobs.get(job_id) or prepared.job
    result = {
        "answer": completion.text,
        "model": ctx.model.model_id,
        "frames": prepared.handoff.result_frames(),
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "cached_tokens": completion.cached_tokens,
        },
        # "stop": the model ended its answer; "length": max_new_tokens did.
        "finish_reason": "stop"
        if completion.token_ids[-1:] and completion.token_ids[-1] in ctx.model.eos_token_ids
        else "length",
        "timings": _timings(job, prepared.handoff, time.time(), {"load_frames": prepared.load_seconds}),
        "batch_size": batch_size,
    }
    if not jobs.succeed(job_id, result):
        log.info("generate: job %s ended otherwise while generating (cancelled?)", job_id)


class _CancelPoll:
    """Which of a batch's jobs were cancelled, asked about every 100 ms while it generates. Redis
    out of reach is an outage to ride out, not the batch's end: no cancellation is known this time,
    and the next poll asks again."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self.failing = False

    def __call__(self, job_ids: list[str]) -> set[str]:
        try:
            cancelled = {job_id for job_id in job_ids if self.jobs.is_cancelled(job_id)}
        except redis.RedisError as exc:
            if not self.failing:
                log.warning("cannot read cancellations (%s: %s); generation goes on", type(exc).__name__, exc)
                self.failing = True
            return set()
        if self.failing:
            log.info("cancellations can be read again")
            self.failing = False
        return cancelled


def answer_jobs(
    job_ids: list[str],
    ctx: AnswerContext,
    ahead: Mapping[str, LoadedJob] | None = None,
    *,
    admit: Callable[[int], list[str]] | None = None,
) -> dict[str, TransientError]:
    """Run the GPU stage of several jobs as one batch.

    Each job reaches one terminal state, written once, as soon as its own answer is complete; a
    job cancelled meanwhile stops generating within about 100 ms plus one step. Returns the jobs
    that met a transient error (storage unreachable) and should be tried again later; they stay
    ``generating``, which a retry accepts. ``ahead`` holds jobs already loaded (``load_job``);
    it is read as each job starts, so jobs handed over by ``admit`` may be added to it meanwhile.

    ``admit(free_rows)`` (in-flight batching only) is asked between decode steps for the ids of
    up to that many more jobs whose messages the caller holds; it must not block (it hands over
    what is already claimed, or nothing). They are prepared here and join the batch, and end as
    the others do: their time limit starts when they join, and the returned retries include them.
    The caller settles their messages after this returns, as it does the first ones'.
    """
    jobs = ctx.jobs
    retry: dict[str, TransientError] = {}
    prepared: dict[str, _Prepared] = {}
    for job_id in dict.fromkeys(job_ids):
        try:
            with job_context(job_id):  # lines about a batch's other jobs carry their own id
                ready = _prepare(job_id, ctx, (ahead or {}).get(job_id))
        except TransientError as exc:
            retry[job_id] = exc
            continue
        if ready is not None:
            prepared[job_id] = ready
    if not prepared and admit is None:
        return retry
    started = time.time()
    for job_id in prepared:
        jobs.mark(job_id, "generate", "start", at=started)

    def settle(outcome: Outcome) -> None:
        with job_context(outcome.key):
            if outcome.completion is not None:
                # The jobs of this run so far: with in-flight batching, later ones join after it.
                _publish(prepared[outcome.key], outcome.completion, ctx, len(prepared))
                return
            jobs.mark(outcome.key, "generate", "end")
            if outcome.error is not None:
                jobs.fail(outcome.key, outcome.error.code, outcome.error.message)

    def joining(free_rows: int) -> list[BatchItem]:
        assert admit is not None
        items = []
        for job_id in admit(free_rows):
            if job_id in prepared or job_id in retry:
                continue
            try:
                with job_context(job_id):
                    ready = _prepare(job_id, ctx, (ahead or {}).get(job_id))
            except TransientError as exc:
                retry[job_id] = exc
                continue
            if ready is None:
                continue
            joined = time.time()
            prepared[job_id] = ready
            jobs.mark(job_id, "generate", "start", at=joined)
            deadline = joined + ctx.time_limit_s if ctx.time_limit_s else None
            items.append(BatchItem(job_id, ready.prompt, deadline=deadline))
        return items

    tokens = TokenStream(ctx.model.processor.tokenizer, ctx.model.eos_token_ids, JobEvents(jobs.client).publish_tokens)
    items = [BatchItem(job_id, ready.prompt) for job_id, ready in prepared.items()]
    deadline = started + ctx.time_limit_s if ctx.time_limit_s else None
    try:
        if ctx.inflight:
            outcomes = run_inflight(
                ctx.model, items, admit=joining if admit is not None else None, max_rows=ctx.max_rows,
                on_outcome=settle, cancelled=_CancelPoll(jobs), deadline=deadline, tokens=tokens, prefixes=ctx.prefixes,
                forward=_timed(model_forward(ctx.model), ctx),
            )  # fmt: skip
        else:
            outcomes = run_batch(
                ctx.model, items, on_outcome=settle, cancelled=_CancelPoll(jobs), deadline=deadline, tokens=tokens,
                generate_fn=_timed(generate_one_call, ctx),
            )  # fmt: skip
    finally:
        tokens.close()
    log.info(
        "generated %d jobs in %.2f s: %s (model_total_s=%.3f)",
        len(outcomes), time.time() - started, describe(outcomes.values()), ctx.model_seconds,
    )  # fmt: skip
    return retry


def _timed(call: Callable[..., Any], ctx: AnswerContext) -> Callable[..., Any]:
    """``call``, adding the seconds it runs to ``ctx.model_seconds``. On CUDA a forward returns
    before its kernels finish; the next one (or the token read after it) waits, so the sum over a
    run still counts the device's time."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        begun = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            ctx.model_seconds += time.perf_counter() - begun

    return timed
