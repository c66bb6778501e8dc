"""The v1 REST routes."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, jsonify, request, stream_with_context, url_for

from api.auth import current_tenant
from api.pagination import page_args
from api.services import current_services
from api.streaming import event_stream, resume_after
from api.submission import submit_job
from api.waiting import preferred_wait, wait_for_end, wait_seconds
from common.errors import Conflict, InvalidRequest, NotFound
from common.events import JobEvents
from common.handoff import Handoff
from common.jobs import Job, JobStatus, JobStore

bp = Blueprint("v1", __name__)
_FRAME_NUMBER = re.compile(r"[0-9]{1,6}")


def _job_body(job: Job) -> dict[str, Any]:
    body = job.to_public()
    body["links"] = {"self": url_for("v1.get_job", job_id=job.id)}
    return body


def _load(job_id: str) -> Job:
    job = current_services().jobs.get(job_id)
    # Another tenant's job is indistinguishable from one that does not exist.
    if job is None or job.tenant != current_tenant().name:
        raise NotFound(f"no job {job_id!r} (unknown, or past retention)")
    return job


def _wait(job: Job, seconds: float) -> Job:
    services = current_services()
    return wait_for_end(services.jobs, JobEvents(services.redis), job.id, seconds) or job


@bp.post("/v1/jobs")
def create_job() -> tuple[Response, int, dict[str, str]]:
    services = current_services()
    # Checked before the job exists: a bad preference must not leave a job behind.
    prefer = preferred_wait(request.headers.getlist("Prefer"))
    wait = wait_seconds(prefer, "Prefer: wait") if prefer is not None else None
    job, replayed = submit_job(
        request,
        settings=services.settings,
        jobs=services.jobs,
        store=services.store,
        enqueue_ingest=services.enqueue_ingest,
        tenant=current_tenant(),
        idempotency=services.idempotency,
        video_store=services.videos,
        enqueue_generate=services.enqueue_generate,
    )
    headers = {"Location": url_for("v1.get_job", job_id=job.id)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if wait is None:
        return jsonify(_job_body(job)), 202, headers
    job = _wait(job, wait)
    headers["Preference-Applied"] = f"wait={prefer}"
    return jsonify(_job_body(job)), 200 if job.status.terminal else 202, headers


@bp.get("/v1/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    wait = request.args.get("wait")
    seconds = wait_seconds(wait, "wait") if wait is not None else None
    job = _load(job_id)
    return jsonify(_job_body(job if seconds is None else _wait(job, seconds)))


@bp.get("/v1/jobs/<job_id>/events")
def job_events(job_id: str) -> Response:
    services = current_services()
    after = resume_after(request.headers.get("Last-Event-ID"))
    job = _load(job_id)
    stream = event_stream(
        services.jobs, JobEvents(services.redis), job, after, _job_body, services.settings.events_heartbeat_s
    )
    return Response(
        stream_with_context(stream),
        mimetype="text/event-stream",
        # No cache may keep it and no proxy buffer it (nginx reads X-Accel-Buffering).
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@bp.get("/v1/jobs/<job_id>/frames/<n>")
def job_frame(job_id: str, n: str) -> Response:
    """The job's ``n``-th sampled frame as stored (PNG): ``n`` counts as ``result.frames`` does."""
    if not _FRAME_NUMBER.fullmatch(n):
        raise InvalidRequest(f"frame number must be a whole number from 0; got {n!r}")
    job = _load(job_id)
    if job.media is None:
        raise NotFound(f"job {job_id} has no frames yet (they are stored once it has been ingested)")
    keys = [frame.key for video in Handoff.of(job).videos for frame in video.frames]
    if int(n) >= len(keys):
        raise NotFound(f"job {job_id} has {len(keys)} frames, numbered from 0")
    try:
        data = current_services().store.get_bytes(keys[int(n)])
    except NotFound:
        # The storage key is internal; the caller learns only that the frame is gone.
        raise NotFound(f"frame {n} of job {job_id} is no longer stored (past retention)") from None
    # Private: the frame belongs to one tenant, and a shared cache must not keep it.
    return Response(data, mimetype="image/png", headers={"Cache-Control": "private, max-age=3600"})


@bp.delete("/v1/jobs/<job_id>")
def cancel_job(job_id: str) -> Response:
    jobs: JobStore = current_services().jobs
    job = _load(job_id)
    if not jobs.cancel(job_id):
        job = _load(job_id)
        if job.status.terminal:
            raise Conflict(f"job {job_id} already ended as {job.status}")
    return jsonify(_job_body(_load(job_id)))


@bp.get("/v1/jobs")
def list_jobs() -> Response:
    limit, before = page_args(request.args)
    jobs = current_services().jobs.list(
        limit=limit, before=before, tenant=current_tenant().name, statuses=_statuses(request.args.get("status"))
    )
    next_cursor = jobs[-1].created_at if len(jobs) == limit else None
    return jsonify({"jobs": [_job_body(job) for job in jobs], "next_before": next_cursor})


def _statuses(value: str | None) -> frozenset[JobStatus] | None:
    """``?status=succeeded,failed``; an unknown status is a 400 rather than an empty page."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in {str(status) for status in JobStatus}]
    if unknown or not names:
        raise InvalidRequest(
            f"status must be one or more of {', '.join(JobStatus)} (comma-separated); got {value!r}",
            details=[{"field": "status", "message": f"unknown status {', '.join(map(repr, unknown)) or repr(value)}"}],
        )
    return frozenset(JobStatus(name) for name in names)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})
