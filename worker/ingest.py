"""The CPU stage of a job: fetch each video, sample and resize its frames, store them, hand the
job to the GPU queue. A plain function; the Celery task only wraps it."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import TransientError, VideoQAError
from common.jobs import JobStatus, JobStore
from common.schemas import Sampling, StoredRequest
from common.settings import Settings
from common.storage import ObjectStore
from worker.fetch import fetch_media
from worker.frames import sample_frames
from worker.geometry import FrameGeometry, encode_png, open_still_image

log = logging.getLogger(__name__)


@dataclass
class IngestContext:
    settings: Settings
    jobs: JobStore
    store: ObjectStore
    geometry: Callable[[], FrameGeometry]
    enqueue_generate: Callable[[str], None]


class _Timer:
    """Adds up seconds per stage over all the media of one job."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 4)


def frames_prefix(video_sha256: str, sampling: Sampling, geometry: FrameGeometry) -> str:
    """Deterministic: the same bytes sampled the same way always land under the same keys."""
    params = json.dumps(
        {"sampling": sampling.model_dump(), "geometry": geometry.key(), "version": 1}, sort_keys=True
    )
    return f"frames/{video_sha256}/{hashlib.sha256(params.encode()).hexdigest()[:16]}"


def _ingest_video(
    path: Path, sha256: str, request: StoredRequest, geometry: FrameGeometry, store: ObjectStore, timer: _Timer
) -> list[dict[str, Any]]:
    prefix = frames_prefix(sha256, request.sampling, geometry)
    manifest_key = f"{prefix}/manifest.json"
    if store.exists(manifest_key):
        return json.loads(store.get_bytes(manifest_key))
    started = time.perf_counter()
    frames = sample_frames(path, request.sampling)
    resized = [geometry.resize(frame.image) for frame in frames]
    timer.add("decode", started)
    started = time.perf_counter()
    entries = []
    for position, (frame, image) in enumerate(zip(frames, resized, strict=True)):
        key = f"{prefix}/{position:04d}.png"
        store.put_bytes(key, encode_png(image), content_type="image/png")
        entries.append({"index": frame.index, "time": frame.time, "key": key})
    # Written last: its presence means every frame is stored.
    store.put_bytes(manifest_key, json.dumps(entries).encode(), content_type="application/json")
    timer.add("store_frames", started)
    return entries


def _ingest_image(path: Path, sha256: str, geometry: FrameGeometry, store: ObjectStore, timer: _Timer) -> str:
    key = f"images/{sha256}/{geometry.key()}.png"
    if not store.exists(key):
        started = time.perf_counter()
        image = geometry.resize(open_still_image(str(path)))
        timer.add("decode", started)
        started = time.perf_counter()
        store.put_bytes(key, encode_png(image), content_type="image/png")
        timer.add("store_frames", started)
    return key


def ingest_job(job_id: str, ctx: IngestContext) -> None:
    jobs = ctx.jobs
    job = jobs.get(job_id)
    if job is None:
        log.warning("ingest: job %s does not exist (expired?); dropped", job_id)
        return
    if not jobs.transition(job_id, JobStatus.INGESTING, allowed_from={JobStatus.QUEUED, JobStatus.INGESTING}):
        log.info("ingest: job %s is %s; nothing to do", job_id, job.status)
        return
    jobs.add_attempt(job_id)
    jobs.mark(job_id, "ingest", "start")
    request = StoredRequest.model_validate(job.request)
    timer = _Timer()
    try:
        geometry = ctx.geometry()
        media: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="videoqa-") as tmp:
            for kind, sources in (("video", request.videos), ("image", request.images)):
                for position, source in enumerate(sources):
                    if jobs.is_cancelled(job_id):
                        return
                    started = time.perf_counter()
                    fetched = fetch_media(source, Path(tmp) / f"{kind}-{position}", settings=ctx.settings, store=ctx.store)
                    timer.add("download", started)
                    if kind == "video":
                        frames = _ingest_video(fetched.path, fetched.sha256, request, geometry, ctx.store, timer)
                        media.append({"kind": kind, "position": position, "frames": frames})
                    else:
                        key = _ingest_image(fetched.path, fetched.sha256, geometry, ctx.store, timer)
                        media.append({"kind": kind, "position": position, "key": key})
                    fetched.path.unlink(missing_ok=True)
    except TransientError:
        raise
    except VideoQAError as exc:
        log.info("ingest: job %s failed: %s %s", job_id, exc.code, exc.message)
        jobs.mark(job_id, "ingest", "end")
        jobs.fail(job_id, exc.code, exc.message)
        return
    jobs.mark(job_id, "ingest", "end")
    moved = jobs.transition(
        job_id,
        JobStatus.QUEUED_GPU,
        allowed_from={JobStatus.INGESTING},
        media=media,
        ingest_timings=timer.seconds,
        attempts="0",
    )
    if moved:
        jobs.mark(job_id, "queue_gpu", "start")
        ctx.enqueue_generate(job_id)
