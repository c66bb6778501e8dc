"""Turning ``POST /v1/videos`` into a stored video: parse, check, keep the upload, record, enqueue
the CPU task that samples its frames once."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import Request
from pydantic import ValidationError
from werkzeug.datastructures import FileStorage

from api.auth import Tenant
from api.errors import invalid, validation_problems
from api.idempotency import Claim, IdempotencyKeys, check_key, fingerprint
from api.problems import unknown_field_message
from api.submission import SAMPLING_FIELDS, _discard_uploads, _store_upload
from common.errors import InvalidRequest, ServiceUnavailable
from common.schemas import MediaSource, Sampling, VideoRequest
from common.settings import Settings
from common.storage import ObjectStore
from common.url_policy import BlockedUrl, UrlPolicy
from common.videos import Video, VideoStore

VIDEO_FILE_FIELD = "video"
# Keeps the idempotency keys of videos apart from those of jobs.
IDEMPOTENCY_SCOPE = "videos:"

log = logging.getLogger(__name__)


def _parse_json(req: Request) -> VideoRequest:
    body = req.get_json(silent=True)
    if body is None:
        raise InvalidRequest("the body is not valid JSON", details=[{"field": "body", "message": "invalid JSON"}])
    if not isinstance(body, dict):
        raise invalid([{"field": "body", "message": "must be a JSON object"}])
    try:
        return VideoRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid(validation_problems(exc)) from None


def _parse_multipart(req: Request) -> tuple[Sampling, FileStorage]:
    """One file in ``video``; the sampling options as flat text fields."""
    unknown = [name for name in req.form if name not in SAMPLING_FIELDS]
    unknown += [name for name in req.files if name != VIDEO_FILE_FIELD]
    if unknown:
        allowed = (*SAMPLING_FIELDS, VIDEO_FILE_FIELD)
        raise invalid(
            [
                {"field": name, "message": unknown_field_message(name, allowed, flat=True)}
                for name in sorted(set(unknown))
            ]
        )
    files = req.files.getlist(VIDEO_FILE_FIELD)
    if len(files) != 1:
        raise invalid([{"field": VIDEO_FILE_FIELD, "message": f"one video file is required, not {len(files)}"}])
    try:
        options = {name: req.form[name] for name in SAMPLING_FIELDS if req.form.get(name, "") != ""}
        sampling = Sampling.model_validate(options)
    except ValidationError as exc:
        raise invalid(validation_problems(exc, flat=True)) from None
    return sampling, files[0]


def _problems(url: str | None, sampling: Sampling, settings: Settings, tenant: Tenant) -> list[dict[str, str]]:
    problems = []
    if sampling.num_frames > settings.max_frames:
        field = "sampling.num_frames" if url is not None else "num_frames"
        problems.append({"field": field, "message": f"at most {settings.max_frames} frames per video"})
    if url is None:
        return problems
    if url.lower().startswith(("http://", "https://")):
        try:
            UrlPolicy.from_allowlist(settings.fetch_allowlist_entries).check(url)
        except BlockedUrl as exc:
            problems.append({"field": "url", "message": exc.message})
    elif not settings.is_s3:
        problems.append({"field": "url", "message": "s3:// URLs need S3 storage, and this service has none"})
    elif tenant.key_sha256 and not tenant.may_read_s3(url):
        problems.append({"field": "url", "message": "outside the s3 prefixes of this API key"})
    return problems


def submit_video(
    req: Request,
    *,
    settings: Settings,
    videos: VideoStore,
    store: ObjectStore,
    enqueue_video: Any,
    tenant: Tenant,
    idempotency: IdempotencyKeys | None = None,
) -> tuple[Video, bool]:
    """The video created, and whether an earlier request with the same ``Idempotency-Key``
    created it."""
    upload: FileStorage | None = None
    if req.mimetype == "application/json":
        parsed = _parse_json(req)
        url: str | None = parsed.url
        sampling = parsed.sampling
    elif req.mimetype == "multipart/form-data":
        sampling, upload = _parse_multipart(req)
        url = None
    else:
        raise InvalidRequest(
            f"unsupported content type {req.mimetype or 'none'!r}: send application/json or multipart/form-data"
        )
    problems = _problems(url, sampling, settings, tenant)
    if problems:
        raise invalid(problems)

    video_id = uuid.uuid4().hex
    claim: Claim | None = None
    key = req.headers.get("Idempotency-Key")
    if key is not None and idempotency is not None:
        asked = VideoRequest.model_construct(url=url or "", sampling=sampling)
        digest = fingerprint(asked, {"video": [upload] if upload else []})
        held = idempotency.claim(tenant.name, check_key(key), digest, video_id, videos, scope=IDEMPOTENCY_SCOPE)
        if isinstance(held, Video):
            return held, True
        claim = held if isinstance(held, Claim) else None  # the videos' store holds videos only
    try:
        return _create(url, upload, sampling, video_id=video_id, videos=videos, store=store,
                       enqueue_video=enqueue_video, tenant=tenant), False  # fmt: skip
    except Exception:
        if claim is not None and idempotency is not None:
            idempotency.release(claim)
        raise


def _create(
    url: str | None,
    upload: FileStorage | None,
    sampling: Sampling,
    *,
    video_id: str,
    videos: VideoStore,
    store: ObjectStore,
    enqueue_video: Any,
    tenant: Tenant,
) -> Video:
    if upload is not None:
        # Under uploads/<video id>/: the sweeper keeps it while the video's record exists.
        source = _store_upload(store, video_id, "video", 0, upload)
    else:
        assert url is not None
        source = MediaSource.from_url(url)
    try:
        video = videos.create(source.model_dump(), sampling.model_dump(), tenant=tenant.name, video_id=video_id)
    except Exception:
        if upload is not None:
            _discard_uploads(store, video_id)
        raise
    try:
        enqueue_video(video.id)
    except Exception as exc:
        videos.fail(video.id, "service_unavailable", "the video could not be queued")
        raise ServiceUnavailable("the queue is unavailable; try again") from exc
    return video
