"""The v1 routes of stored videos: ingest once (``POST /v1/videos``), then ask many questions by
``video_id``. docs/videos.md describes them."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for

from api.auth import current_tenant
from api.pagination import page_args
from api.services import current_services
from api.video_submission import submit_video
from api.waiting import wait_seconds
from common.errors import Conflict, NotFound, VideoQAError
from common.storage import UPLOADS_PREFIX
from common.videos import Video, VideoInUse, VideoStatus, frames_prefix

videos_bp = Blueprint("videos", __name__)
# How often ``?wait=N`` reads the record again: a video is sampled in seconds, not milliseconds.
WAIT_POLL_S = 0.2

log = logging.getLogger(__name__)


class VideoInUseError(Conflict):
    code = "video_in_use"


def _body(video: Video) -> dict[str, Any]:
    body = video.to_public()
    for frame in body["frames"]:
        frame["url"] = url_for("videos.get_frame", video_id=video.id, n=frame["n"])
    body["links"] = {"self": url_for("videos.get_video", video_id=video.id)}
    return body


def _load(video_id: str) -> Video:
    # Another tenant's video is indistinguishable from one that does not exist.
    video = current_services().videos.get_for(video_id, current_tenant().name)
    if video is None:
        raise NotFound(f"no video {video_id!r} (unknown, deleted, or past retention)")
    return video


def _wait(video: Video, seconds: float) -> Video:
    videos = current_services().videos
    deadline = time.monotonic() + seconds
    while video.status is VideoStatus.PROCESSING and time.monotonic() < deadline:
        time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
        video = videos.get_for(video.id, current_tenant().name) or video
    return video


@videos_bp.post("/v1/videos")
def create_video() -> tuple[Response, int, dict[str, str]]:
    services = current_services()
    video, replayed = submit_video(
        request,
        settings=services.settings,
        videos=services.videos,
        store=services.store,
        enqueue_video=services.enqueue_video,
        tenant=current_tenant(),
        idempotency=services.idempotency,
    )
    headers = {"Location": url_for("videos.get_video", video_id=video.id)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return jsonify(_body(video)), 202, headers


@videos_bp.get("/v1/videos/<video_id>")
def get_video(video_id: str) -> Response:
    wait = request.args.get("wait")
    seconds = wait_seconds(wait, "wait") if wait is not None else None
    video = _load(video_id)
    return jsonify(_body(video if seconds is None else _wait(video, seconds)))


@videos_bp.get("/v1/videos")
def list_videos() -> Response:
    limit, before = page_args(request.args)
    videos = current_services().videos.list(tenant=current_tenant().name, limit=limit, before=before)
    next_cursor = videos[-1].created_at if len(videos) == limit else None
    return jsonify({"videos": [_body(video) for video in videos], "next_before": next_cursor})


@videos_bp.delete("/v1/videos/<video_id>")
def delete_video(video_id: str) -> tuple[str, int]:
    services = current_services()
    try:
        deleted = services.videos.delete(video_id, current_tenant().name)
    except VideoInUse as exc:
        raise VideoInUseError(
            f"video {video_id} is used by job {exc.job_id}, which has not ended; delete the video once it "
            "has (or cancel the job first)"
        ) from None
    if not deleted:
        raise NotFound(f"no video {video_id!r} (unknown, deleted, or past retention)")
    # The record is gone, so no job can claim the video any more: its objects can go too. What
    # cannot be deleted now (storage out of reach) the sweeper deletes, as nothing names it.
    try:
        store = services.store
        prefixes = (frames_prefix(video_id), f"{UPLOADS_PREFIX}{video_id}/")
        keys = [stored.key for prefix in prefixes for stored in store.list_objects(prefix)]
        store.delete(keys)
    except VideoQAError as exc:
        log.warning("the frames of deleted video %s are left to the sweeper: %s", video_id, exc.message)
    return "", 204


@videos_bp.get("/v1/videos/<video_id>/frames/<n>")
def get_frame(video_id: str, n: str) -> Response:
    video = _load(video_id)
    position = int(n) if n.isdigit() and len(n) < 6 else -1
    if not 0 <= position < len(video.frames):
        if video.status is not VideoStatus.READY:
            raise NotFound(f"video {video_id} is {video.status}: it has no frames")
        raise NotFound(f"video {video_id} has frames 0 to {len(video.frames) - 1}, not {n!r}")
    key = video.frames[position]["key"]
    try:
        data = current_services().store.get_bytes(key)
    except NotFound:
        raise NotFound(f"frame {position} of video {video_id} is no longer stored") from None
    response = Response(data, mimetype="image/png")
    # A frame never changes under its URL: cache it (privately: it is a tenant's) until it expires.
    max_age = max(0, int(video.expires_at - time.time()))
    response.headers["Cache-Control"] = f"private, max-age={max_age}, immutable"
    response.set_etag(f"{video.id}-{position}")
    response.make_conditional(request)  # in place: a 304, or a 206 for a range
    return response
