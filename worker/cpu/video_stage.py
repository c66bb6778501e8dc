"""The CPU stage of a stored video (``POST /v1/videos``): sample it once into frames of its own.
A plain function; the Celery task only wraps it."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import TransientError, VideoQAError
from common.schemas import MediaSource, Sampling
from common.settings import Settings
from common.storage import UPLOADS_PREFIX, ObjectStore
from common.videos import VideoStatus, VideoStore, frames_prefix
from worker.cpu.fetch import fetch_media
from worker.cpu.stage import store_frames
from worker.media.decode import DecodeLimits, decode_frames_in_sandbox
from worker.media.geometry import FrameGeometry

log = logging.getLogger(__name__)


@dataclass
class VideoContext:
    settings: Settings
    videos: VideoStore
    store: ObjectStore
    geometry: Callable[[], FrameGeometry]


def _discard(store: ObjectStore, prefix: str) -> None:
    try:
        store.delete([stored.key for stored in store.list_objects(prefix)])
    except VideoQAError as exc:
        log.warning("objects under %s are left to the sweeper: %s", prefix, exc.message)


def ingest_stored_video(video_id: str, ctx: VideoContext) -> None:
    """Fetch, sample and store the frames of a stored video; its record then says ready or failed.

    The same fetch, sandboxed decode and limits as a job's videos (worker.cpu.stage). Transient errors
    propagate (the task retries them); the rest fail the video with their code.
    """
    videos = ctx.videos
    video = videos.get(video_id)
    if video is None or video.status is not VideoStatus.PROCESSING:
        log.info("video %s is %s; nothing to do", video_id, "gone" if video is None else video.status)
        return
    attempts = videos.add_attempt(video_id)
    if attempts > ctx.settings.max_attempts + ctx.settings.transient_retries:
        videos.fail(video_id, "poison", f"sampling the video ended its worker {attempts - 1} times; not tried again")
        return
    source = MediaSource.model_validate(video.source)
    sampling = Sampling.model_validate(video.sampling)
    try:
        with tempfile.TemporaryDirectory(prefix="videoqa-video-") as tmp:
            fetched = fetch_media(source, Path(tmp) / "video", settings=ctx.settings, store=ctx.store)
            sample = decode_frames_in_sandbox(
                fetched.path, sampling, DecodeLimits.from_settings(ctx.settings), geometry=ctx.geometry()
            )
        frames = store_frames(ctx.store, frames_prefix(video_id).rstrip("/"), sample.frames)
    except TransientError:
        raise
    except VideoQAError as exc:
        log.info("video %s failed: %s %s", video_id, exc.code, exc.message)
        videos.fail(video_id, exc.code, exc.message)
        _discard(ctx.store, f"{UPLOADS_PREFIX}{video_id}/")
        return
    if not videos.mark_ready(video_id, frames, frame_count=sample.frame_count, duration=sample.duration):
        # Deleted while it was sampled: nothing will ever name these frames.
        _discard(ctx.store, frames_prefix(video_id))
    # The frames are what jobs use; the uploaded file is not needed any more.
    _discard(ctx.store, f"{UPLOADS_PREFIX}{video_id}/")
