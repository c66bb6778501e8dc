"""The GPU stage of a job: load its stored frames, generate, write the result once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from common.errors import TransientError, VideoQAError
from common.jobs import Job, JobStatus, JobStore
from common.schemas import StoredRequest
from common.storage import ObjectStore
from worker.geometry import decode_png
from worker.inference import LoadedModel, Prompt, generate, render_prompt

log = logging.getLogger(__name__)


@dataclass
class GenerateContext:
    jobs: JobStore
    store: ObjectStore
    model: LoadedModel


def _load_prompt(job: Job, ctx: GenerateContext) -> tuple[Prompt, list[dict[str, Any]]]:
    request = StoredRequest.model_validate(job.request)
    media = job.media or []
    video_frames = []
    images = []
    sampled: list[dict[str, Any]] = []
    for item in media:
        if item["kind"] == "video":
            frames = item["frames"]
            video_frames.append([decode_png(ctx.store.get_bytes(frame["key"])) for frame in frames])
            sampled += [{"video": item["position"], "index": f["index"], "time": f["time"]} for f in frames]
        else:
            images.append(decode_png(ctx.store.get_bytes(item["key"])))
    return render_prompt(ctx.model.processor, request, video_frames, images), sampled


TIMING_ORDER = ("queue_wait", "download", "decode", "store_frames", "ingest", "queue_gpu", "load_frames", "generate")


def _timings(job: Job, now: float, extra: dict[str, float]) -> dict[str, float]:
    """Seconds per stage, in pipeline order, then the total from submission to result."""
    measured: dict[str, float] = {**job.ingest_timings, **job.stage_seconds(), **extra}
    if "start" in job.stages.get("ingest", {}):
        measured["queue_wait"] = job.stages["ingest"]["start"] - job.created_at
    timings = {name: round(measured[name], 4) for name in TIMING_ORDER if name in measured}
    timings["total"] = round(now - job.created_at, 4)
    return timings


def generate_job(job_id: str, ctx: GenerateContext) -> None:
    jobs = ctx.jobs
    job = jobs.get(job_id)
    if job is None:
        log.warning("generate: job %s does not exist (expired?); dropped", job_id)
        return
    if not jobs.transition(job_id, JobStatus.GENERATING, allowed_from={JobStatus.QUEUED_GPU, JobStatus.GENERATING}):
        log.info("generate: job %s is %s; nothing to do", job_id, job.status)
        return
    jobs.add_attempt(job_id)
    if "end" not in job.stages.get("queue_gpu", {}):
        jobs.mark(job_id, "queue_gpu", "end")
    try:
        started = time.perf_counter()
        prompt, sampled = _load_prompt(job, ctx)
        load_seconds = time.perf_counter() - started
        jobs.mark(job_id, "generate", "start")
        completion = generate(ctx.model, [prompt])[0]
        jobs.mark(job_id, "generate", "end")
    except TransientError:
        raise
    except VideoQAError as exc:
        jobs.fail(job_id, exc.code, exc.message)
        return
    job = jobs.get(job_id) or job
    result = {
        "answer": completion.text,
        "model": ctx.model.model_id,
        "frames": sampled,
        "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
        "timings": _timings(job, time.time(), {"load_frames": load_seconds}),
    }
    if not jobs.succeed(job_id, result):
        log.info("generate: job %s ended otherwise while generating (cancelled?)", job_id)
