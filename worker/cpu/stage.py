"""The CPU stage of a job: fetch each video, sample and resize its frames, store them, hand the
job to the GPU queue. A plain function; the Celery task only wraps it."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import TransientError, VideoQAError
from common.handoff import FrameRef, Handoff, ImageMedia, StoredFrame, VideoMedia, dump_frames, load_frames
from common.job_size import check_sampled_size
from common.jobs import JobStatus, JobStore
from common.schemas import MediaSource, Sampling, StoredRequest
from common.settings import Settings
from common.storage import ObjectStore
from common.videos import VideoStore, VideoUnavailable
from worker.cpu.fetch import fetch_if_changed, fetch_media, known_version, remember_version
from worker.cpu.frame_store import ContentKeys
from worker.media.decode import DecodeLimits, decode_frames_in_sandbox
from worker.media.geometry import FrameGeometry
from worker.media.png import encode_png
from worker.media.sampling import SampledFrame
from worker.media.still_image import decode_image

log = logging.getLogger(__name__)

# Frames encoded and stored at once: enough for every core of a CPU worker and for a storage
# service's round trips to overlap.
_STORE_THREADS = 8


@dataclass
class IngestContext:
    settings: Settings
    jobs: JobStore
    store: ObjectStore
    geometry: Callable[[], FrameGeometry]
    enqueue_answer: Callable[[str], None]
    videos: VideoStore | None = None


class StageTimer:
    """Adds up seconds per stage over all the media of one job."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 4)


def frames_prefix(
    video_sha256: str, sampling: Sampling, geometry: FrameGeometry, *, scope: str = "", period: int = 0
) -> str:
    """Deterministic: the same bytes sampled the same way in the same scope and retention period
    always land under the same keys. ``version`` changes when the frames sampled for the same bytes
    do (2: checked seeks)."""
    params = json.dumps({"sampling": sampling.model_dump(), "geometry": geometry.key(), "version": 2}, sort_keys=True)
    return f"{scope}frames/{video_sha256}/{hashlib.sha256(params.encode()).hexdigest()[:16]}/p{period}"


def ingest_video(
    source: MediaSource,
    target: Path,
    sampling: Sampling,
    geometry: FrameGeometry,
    settings: Settings,
    store: ObjectStore,
    timer: StageTimer,
    keys: ContentKeys | None = None,
) -> list[StoredFrame]:
    """Fetch, sample and store one video; its frames' entries in the manifest.

    Frames already stored for the same bytes and parameters, in the job's scope and young enough
    (worker.cpu.frame_store), are reused: the video is not decoded again, and an http(s) URL whose ETag is
    unchanged is not even downloaded again.
    """
    keys = keys or ContentKeys.shared(settings.storage_retention_s)

    def stored_manifest(sha256: str) -> str | None:
        candidates = keys.candidates(lambda period: _manifest_key(sha256, sampling, geometry, keys, period))
        return keys.reusable(store, candidates)

    started = time.perf_counter()
    fetched = None
    known = known_version(source, store, scope=keys.scope)
    if known is not None and (manifest := stored_manifest(known.sha256)) is not None:
        fetched = fetch_if_changed(source, target, known, settings=settings, store=store)
        if fetched is None:
            timer.add("download", started)
            return load_frames(json.loads(store.get_bytes(manifest)))
    if fetched is None:
        fetched = fetch_media(source, target, settings=settings, store=store)
    timer.add("download", started)
    remember_version(source, fetched, store, scope=keys.scope)
    try:
        if (manifest := stored_manifest(fetched.sha256)) is not None:
            return load_frames(json.loads(store.get_bytes(manifest)))
        started = time.perf_counter()
        sample = decode_frames_in_sandbox(
            fetched.path, sampling, DecodeLimits.from_settings(settings), geometry=geometry
        )
        timer.add("decode", started)
    finally:
        fetched.path.unlink(missing_ok=True)
    started = time.perf_counter()
    prefix = frames_prefix(fetched.sha256, sampling, geometry, scope=keys.scope, period=keys.period)
    entries = store_frames(store, prefix, sample.frames)
    # Written last: its presence means every frame is stored.
    manifest_body = json.dumps(dump_frames(entries)).encode()
    store.put_bytes(f"{prefix}/manifest.json", manifest_body, content_type="application/json")
    timer.add("store_frames", started)
    return entries


def store_frames(store: ObjectStore, prefix: str, frames: Sequence[SampledFrame]) -> list[StoredFrame]:
    """Encode and store each frame as ``{prefix}/{position:04d}.png``; their manifest entries.

    Frames are encoded and stored on threads: Pillow's PNG encoder compresses without holding the
    GIL and storage calls wait on the network, so the frames share the worker's cores and their
    round trips overlap."""

    def put(position: int) -> str:
        key = f"{prefix}/{position:04d}.png"
        store.put_bytes(key, encode_png(frames[position].image), content_type="image/png")
        return key

    with concurrent.futures.ThreadPoolExecutor(min(_STORE_THREADS, max(1, len(frames))), "store-frame") as pool:
        keys = list(pool.map(put, range(len(frames))))
    entries = []
    for frame, key in zip(frames, keys, strict=True):
        stand_in = frame.stands_in_for
        entries.append(StoredFrame(
            index=frame.index,
            time=frame.time,
            key=key,
            offset=frame.offset,
            stands_in_for=None if stand_in is None else FrameRef(index=stand_in.index, time=stand_in.time),
        ))  # fmt: skip
    return entries


def _manifest_key(sha256: str, sampling: Sampling, geometry: FrameGeometry, keys: ContentKeys, period: int) -> str:
    return f"{frames_prefix(sha256, sampling, geometry, scope=keys.scope, period=period)}/manifest.json"


def _ingest_image(
    path: Path,
    sha256: str,
    geometry: FrameGeometry,
    settings: Settings,
    store: ObjectStore,
    timer: StageTimer,
    keys: ContentKeys,
) -> str:
    def key_of(period: int) -> str:
        return f"{keys.scope}images/{sha256}/{geometry.key()}-p{period}.png"

    key = keys.reusable(store, keys.candidates(key_of))
    if key is None:
        key = key_of(keys.period)
        started = time.perf_counter()
        image = decode_image(path, geometry, settings)
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
    if not jobs.begin_attempt(job_id, ctx.settings.max_attempts):
        log.warning("ingest: job %s failed as poison", job_id)
        return
    jobs.mark(job_id, "ingest", "start")
    request = StoredRequest.model_validate(job.request)
    keys = ContentKeys.for_job(job.tenant, ctx.settings)
    timer = StageTimer()
    try:
        geometry = ctx.geometry()
        handoff = Handoff()
        with tempfile.TemporaryDirectory(prefix="videoqa-") as tmp:
            for kind, sources in (("video", request.videos), ("image", request.images)):
                for position, source in enumerate(sources):
                    if jobs.is_cancelled(job_id):
                        return
                    target = Path(tmp) / f"{kind}-{position}"
                    if source.kind == "video":
                        # A stored video: its frames as sampled once, nothing fetched or decoded.
                        if ctx.videos is None:
                            raise VideoUnavailable(f"video {source.location}: this worker keeps no stored videos")
                        stored = load_frames(ctx.videos.frames_for_job(source.location, job.tenant))
                        handoff.media.append(VideoMedia(position=position, frames=stored, video_id=source.location))
                        continue
                    if kind == "video":
                        frames = ingest_video(
                            source, target, request.sampling, geometry, ctx.settings, ctx.store, timer, keys
                        )
                        handoff.media.append(VideoMedia(position=position, frames=frames))
                        continue
                    started = time.perf_counter()
                    fetched = fetch_media(source, target, settings=ctx.settings, store=ctx.store)
                    timer.add("download", started)
                    key = _ingest_image(fetched.path, fetched.sha256, geometry, ctx.settings, ctx.store, timer, keys)
                    handoff.media.append(ImageMedia(position=position, key=key))
                    fetched.path.unlink(missing_ok=True)
        # The API checked an upper bound; what was sampled is checked again before a GPU sees it
        # (an API configured with larger limits than its workers, say).
        check_sampled_size(
            request.question, request.prompt, handoff.image_count, request.generation.max_new_tokens, ctx.settings,
            history=[turn.content for turn in request.history],
        )  # fmt: skip
    except TransientError:
        jobs.note_retry(job_id)
        raise
    except VideoQAError as exc:
        log.info("ingest: job %s failed: %s %s", job_id, exc.code, exc.message)
        jobs.mark(job_id, "ingest", "end")
        jobs.fail(job_id, exc.code, exc.message)
        return
    jobs.mark(job_id, "ingest", "end")
    handoff.ingest_timings = timer.seconds
    moved = jobs.transition(
        job_id,
        JobStatus.QUEUED_GPU,
        allowed_from={JobStatus.INGESTING},
        **handoff.record_fields(),
        attempts="0",
        retries="0",
    )
    if moved:
        jobs.mark(job_id, "queue_gpu", "start")
        ctx.enqueue_answer(job_id)
