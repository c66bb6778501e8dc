"""Turning an HTTP request into a stored job: parse, validate, keep uploads, record, enqueue."""

from __future__ import annotations

import json
import logging
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

from flask import Request
from pydantic import ValidationError
from werkzeug.datastructures import FileStorage

from api import stored_media
from api.auth import PUBLIC, Tenant
from api.errors import invalid, validation_problems
from api.idempotency import Claim, IdempotencyKeys, check_key, fingerprint
from api.problems import flat_problems, unknown_field_message
from common.errors import InvalidRequest, ServiceUnavailable, TooManyActiveJobs, VideoQAError
from common.jobs import Job, JobStore
from common.logging_config import job_id_var
from common.schemas import (
    GENERATION_FIELDS,
    SAMPLING_FIELDS,
    JobRequest,
    MediaInput,
    MediaSource,
    StoredRequest,
    check_limits,
)
from common.settings import Settings
from common.storage import UPLOADS_PREFIX, ObjectStore
from common.url_policy import BlockedUrl, UrlPolicy
from common.videos import VideoStore

FILE_FIELDS = ("videos", "images")
WEBHOOK_FIELDS = ("webhook_url", "webhook_events")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")

log = logging.getLogger(__name__)


def parse_json_body(req: Request, settings: Settings) -> tuple[JobRequest, list[FileStorage], list[FileStorage]]:
    body = req.get_json(silent=True)
    if body is None:
        raise InvalidRequest("the body is not valid JSON", details=[{"field": "body", "message": "invalid JSON"}])
    if not isinstance(body, dict):
        raise invalid([{"field": "body", "message": "must be a JSON object"}])
    try:
        return JobRequest.parse(body, settings), [], []
    except ValidationError as exc:
        raise invalid(validation_problems(exc)) from None


def parse_multipart_body(req: Request, settings: Settings) -> tuple[JobRequest, list[FileStorage], list[FileStorage]]:
    """Multipart carries files in ``videos``/``images`` and options as flat text fields."""
    text_fields = ("question", "prompt", *SAMPLING_FIELDS, *GENERATION_FIELDS, *WEBHOOK_FIELDS)
    unknown = [name for name in req.form if name not in text_fields]
    unknown += [name for name in req.files if name not in FILE_FIELDS]
    if unknown:
        allowed = (*text_fields, *FILE_FIELDS)
        raise invalid(
            [
                {"field": name, "message": unknown_field_message(name, allowed, flat=True)}
                for name in sorted(set(unknown))
            ]
        )
    body: dict[str, Any] = {
        "sampling": {name: req.form[name] for name in SAMPLING_FIELDS if req.form.get(name, "") != ""},
        "generation": {name: req.form[name] for name in GENERATION_FIELDS if req.form.get(name, "") != ""},
    }
    for name in ("question", "prompt"):
        if name in req.form:
            body[name] = req.form[name]
    if any(req.form.get(name, "") != "" for name in WEBHOOK_FIELDS):
        body["webhook"] = {"url": req.form["webhook_url"]} if req.form.get("webhook_url", "") != "" else {}
        # Repeated fields or one comma-separated list, as a curl user writes them.
        events = [e.strip() for value in req.form.getlist("webhook_events") for e in value.split(",") if e.strip()]
        if events:
            body["webhook"]["events"] = events
    try:
        parsed = JobRequest.parse(body, settings)
    except ValidationError as exc:
        raise invalid(validation_problems(exc, flat=True)) from None
    return parsed, req.files.getlist("videos"), req.files.getlist("images")


def _store_upload(store: ObjectStore, job_id: str, kind: str, position: int, upload: FileStorage) -> MediaSource:
    filename = _SAFE_NAME.sub("_", Path(upload.filename or f"{kind}-{position}").name)[-100:]
    key = f"{UPLOADS_PREFIX}{job_id}/{kind}-{position}-{filename}"
    with tempfile.NamedTemporaryFile(suffix=".upload") as tmp:
        upload.save(tmp)
        tmp.flush()
        if tmp.tell() == 0:
            raise invalid([{"field": f"{kind}[{position}]", "message": "the file is empty"}])
        store.put_file(key, Path(tmp.name))
    return MediaSource(kind="upload", location=key, filename=upload.filename)


# One video or image of a job, in the job's order: a file sent with the request, or a URL.
MediaEntry = FileStorage | MediaInput


def _sources(store: ObjectStore, job_id: str, kind: str, media: list[MediaEntry]) -> list[MediaSource]:
    return [
        _store_upload(store, job_id, kind, position, item)
        if isinstance(item, FileStorage)
        else MediaSource.from_input(item)
        for position, item in enumerate(media)
    ]


def _store_media(
    store: ObjectStore, job_id: str, videos: list[MediaEntry], images: list[MediaEntry]
) -> tuple[list[MediaSource], list[MediaSource]]:
    try:
        return _sources(store, job_id, "video", videos), _sources(store, job_id, "image", images)
    except Exception:
        # A later file was refused (empty, storage failed): the job will not exist.
        _discard_uploads(store, job_id)
        raise


def _discard_uploads(store: ObjectStore, job_id: str) -> None:
    try:
        store.delete([stored.key for stored in store.list_objects(f"{UPLOADS_PREFIX}{job_id}/")])
    except VideoQAError as exc:
        log.warning("uploads of a job not created are left to the sweeper: %s", exc.message)


def _blocked_urls(request: JobRequest, policy: UrlPolicy) -> list[dict[str, str]]:
    """Refuse internal targets before anything connects; the worker checks again at download."""
    problems = []
    for kind, items in (("videos", request.videos), ("images", request.images)):
        for position, item in enumerate(items):
            if item.url is not None and item.url.lower().startswith(("http://", "https://")):
                try:
                    policy.check(item.url)
                except BlockedUrl as exc:
                    problems.append({"field": f"{kind}.{position}.url", "message": exc.message})
    return problems


def _webhook_problems(request: JobRequest, settings: Settings, policy: UrlPolicy) -> list[dict[str, str]]:
    """A webhook is refused, rather than sent unsigned, when there is no key to sign it with."""
    if request.webhook is None:
        return []
    if settings.webhook_secret is None:
        message = "webhooks are off: this service has no VIDEOQA_WEBHOOK_SECRET to sign them"
        return [{"field": "webhook", "message": message}]
    try:
        policy.check(request.webhook.url)
    except BlockedUrl as exc:
        return [{"field": "webhook.url", "message": exc.message}]
    return []


def _foreign_s3_keys(request: JobRequest, tenant: Tenant) -> list[dict[str, str]]:
    """With API keys, a tenant reads only the s3:// prefixes its key lists."""
    problems = []
    for kind, items in (("videos", request.videos), ("images", request.images)):
        for position, item in enumerate(items):
            if item.url is not None and item.url.lower().startswith("s3://") and not tenant.may_read_s3(item.url):
                problems.append(
                    {"field": f"{kind}.{position}.url", "message": "outside the s3 prefixes of this API key"}
                )
    return problems


def submit_job(
    req: Request,
    *,
    settings: Settings,
    jobs: JobStore,
    store: ObjectStore,
    enqueue_ingest: Any,
    tenant: Tenant = PUBLIC,
    idempotency: IdempotencyKeys | None = None,
    video_store: VideoStore | None = None,
    enqueue_generate: Any = None,
) -> tuple[Job, bool]:
    """The job created, and whether it is one an earlier request with the same
    ``Idempotency-Key`` created (nothing new is stored then). With ``enqueue_generate``, a job
    whose frames are all stored goes straight to the GPU queue."""
    if req.mimetype == "application/json":
        parsed, video_files, image_files = parse_json_body(req, settings)
    elif req.mimetype == "multipart/form-data":
        parsed, video_files, image_files = parse_multipart_body(req, settings)
    else:
        raise InvalidRequest(
            f"unsupported content type {req.mimetype or 'none'!r}: send application/json or multipart/form-data"
        )
    # Files first, then URLs: a request carries one or the other, or files in multipart alone.
    return submit_request(
        parsed, [*video_files, *parsed.videos], [*image_files, *parsed.images],
        settings=settings, jobs=jobs, store=store, enqueue_ingest=enqueue_ingest, tenant=tenant,
        idempotency=idempotency, idempotency_key=req.headers.get("Idempotency-Key"),
        flat=req.mimetype == "multipart/form-data", video_store=video_store, enqueue_generate=enqueue_generate,
    )  # fmt: skip


def submit_request(
    parsed: JobRequest,
    videos: list[MediaEntry],
    images: list[MediaEntry],
    *,
    settings: Settings,
    jobs: JobStore,
    store: ObjectStore,
    enqueue_ingest: Any,
    tenant: Tenant = PUBLIC,
    idempotency: IdempotencyKeys | None = None,
    idempotency_key: str | None = None,
    flat: bool = False,
    video_store: VideoStore | None = None,
    enqueue_generate: Any = None,
) -> tuple[Job, bool]:
    """Check, store and queue a parsed request whose media are ``videos`` and ``images`` in the
    job's order (``parsed.videos`` and ``parsed.images`` are the URLs and stored videos among
    them); ``flat``: problems are named as a multipart form names its fields. With
    ``enqueue_generate``, a job whose frames are all stored goes straight to the GPU queue."""
    video_files = [item for item in videos if isinstance(item, FileStorage)]
    image_files = [item for item in images if isinstance(item, FileStorage)]
    video_store = video_store or VideoStore(jobs.client, ttl_s=settings.storage_retention_s)
    stored = stored_media.peek(parsed, tenant=tenant.name, videos=video_store, jobs=jobs, store=store)
    if stored.parent_request is not None:
        # The parent's turns, then its own: the follow-up continues the conversation.
        parsed = parsed.model_copy(update={"history": stored_media.follow_up_history(stored)})
    problems = check_limits(
        parsed,
        settings,
        uploaded_videos=len(video_files),
        uploaded_images=len(image_files),
        stored_frames=stored.frame_count,
    )
    policy = UrlPolicy.from_allowlist(settings.fetch_allowlist_entries)
    problems += _blocked_urls(parsed, policy)
    problems += _webhook_problems(parsed, settings, policy)
    if flat:
        problems = flat_problems(problems)
    if tenant.key_sha256:
        problems += _foreign_s3_keys(parsed, tenant)
    if problems:
        raise invalid(problems)

    job_id = uuid.uuid4().hex
    claim: Claim | None = None
    if idempotency_key is not None and idempotency is not None:
        digest = fingerprint(parsed, {"videos": video_files, "images": image_files})
        held = idempotency.claim(tenant.name, check_key(idempotency_key), digest, job_id, jobs)
        if isinstance(held, Job):
            job_id_var.set(held.id)
            return held, True
        claim = held
    job_id_var.set(job_id)  # what is logged from here on concerns this job (reset after the request)
    try:
        # Refused here before any upload is stored; ``create`` enforces the cap atomically.
        if jobs.active_count(tenant.name) >= settings.max_active_jobs_per_tenant:
            raise TooManyActiveJobs(settings.max_active_jobs_per_tenant)
        return _create(
            parsed, videos, images,
            job_id=job_id, settings=settings, jobs=jobs, store=store, enqueue_ingest=enqueue_ingest, tenant=tenant,
            stored=stored, video_store=video_store, enqueue_generate=enqueue_generate,
        ), False  # fmt: skip
    except Exception:
        if claim is not None and idempotency is not None:
            idempotency.release(claim)  # no job: the client's retry is a new request
        raise


def _create(
    parsed: JobRequest,
    media_videos: list[MediaEntry],
    media_images: list[MediaEntry],
    *,
    job_id: str,
    settings: Settings,
    jobs: JobStore,
    store: ObjectStore,
    enqueue_ingest: Any,
    tenant: Tenant,
    stored: stored_media.StoredMedia,
    video_store: VideoStore,
    enqueue_generate: Any,
) -> Job:
    stored = stored_media.claim(parsed, stored, job_id=job_id, tenant=tenant.name, videos=video_store)
    if stored.parent_request is not None:
        videos, images = stored.parent_request.videos, stored.parent_request.images
    else:
        videos, images = _store_media(store, job_id, media_videos, media_images)
    media = stored.media_of(videos, images)
    if media is not None and enqueue_generate is None:
        if stored.parent is not None:
            raise InvalidRequest("follow-ups (parent) are not taken here")
        media = None  # without a GPU queue to send to, the CPU stage takes stored frames as they are
    request = StoredRequest(
        question=parsed.question,
        prompt=parsed.prompt,
        videos=videos,
        images=images,
        # A follow-up's media were sampled as its parent asked.
        sampling=stored.parent_request.sampling if stored.parent_request else parsed.sampling,
        generation=parsed.generation,
        webhook=parsed.webhook,
        history=parsed.history,
        parent=parsed.parent,
    )
    try:
        job = jobs.create(
            json.loads(request.model_dump_json()),
            job_id=job_id,
            tenant=tenant.name,
            max_active=settings.max_active_jobs_per_tenant,
            webhook=parsed.webhook is not None,
            media=media,
        )
    except Exception:
        # Redis refused the record (full, unreachable, the tenant's cap reached meanwhile):
        # nothing will ever name these uploads.
        _discard_uploads(store, job_id)
        raise
    try:
        # A job whose frames are all stored already starts queued_gpu: it skips the CPU stage.
        (enqueue_ingest if media is None else enqueue_generate)(job.id)
    except Exception as exc:
        jobs.fail(job.id, "service_unavailable", "the job could not be queued")
        raise ServiceUnavailable("the job queue is unavailable; try again") from exc
    return job
