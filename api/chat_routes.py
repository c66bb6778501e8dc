"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``GET /v1/models[/{id}]``.

A chat completion is an ordinary job (api.chat_request makes one): the same checks, limits,
authentication, rate limits and queues as ``POST /v1/jobs``. Errors on these routes take OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``, which its client libraries raise as
typed exceptions; the service's own error handlers answer, and this blueprint reshapes their body.
"""

from __future__ import annotations

import io
import json
import mimetypes
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request, stream_with_context, url_for
from pydantic import ValidationError
from werkzeug.datastructures import FileStorage

from api.auth import current_tenant
from api.chat_completion import completion_body, completion_chunks, openai_error
from api.chat_request import ChatJob, Medium, chat_job, served_model_ids
from api.errors import invalid, validation_problems
from api.services import Services, current_services
from api.submission import MediaEntry, submit_request
from api.waiting import wait_for_end
from common.errors import InvalidRequest, NotFound, PayloadTooLarge
from common.events import JobEvents
from common.jobs import Job
from common.schemas import JobRequest
from common.settings import Settings

bp = Blueprint("openai", __name__)
JOB_ID_HEADER = "X-Videoqa-Job-Id"
# Job fields named as the chat request names what sets them.
_PARAMS = {
    "generation.max_new_tokens": "max_completion_tokens",
    "generation.temperature": "temperature",
    "generation.top_p": "top_p",
    "sampling.num_frames": "media_io_kwargs.video.num_frames",
    "sampling.fps": "media_io_kwargs.video.fps",
}


def wait_cap_s(settings: Settings) -> float:
    """How long a non-streaming completion waits: each of the job's two stages may take its limit."""
    return 2.0 * settings.task_time_limit_s


@bp.after_request
def _openai_error_shape(response: Response) -> Response:
    if response.status_code < 400 or not response.is_json:
        return response
    body = response.get_json(silent=True)
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or "type" in error:
        return response
    details = error.get("details")
    param = details[0].get("field") if isinstance(details, list) and details and isinstance(details[0], dict) else None
    shaped = openai_error(str(error.get("message", "")), str(error.get("code", "error")), response.status_code, param)
    response.set_data(json.dumps(shaped))
    return response


@bp.post("/v1/chat/completions")
def chat_completions() -> Response | tuple[Response, int, dict[str, str]]:
    services = current_services()
    settings: Settings = services.settings
    if request.mimetype != "application/json":
        raise InvalidRequest(f"send the request as application/json, not {request.mimetype or 'no content type'!r}")
    body = request.get_json(silent=True)
    if body is None:
        raise InvalidRequest("the body is not valid JSON")
    chat = chat_job(body, settings)
    job = _submit(chat, services)
    model = str(body["model"])
    headers = {JOB_ID_HEADER: job.id, "Location": url_for("v1.get_job", job_id=job.id)}
    events = JobEvents(services.redis)
    if chat.stream:
        stream = completion_chunks(services.jobs, events, job, model, chat.include_usage)
        headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(stream_with_context(stream), mimetype="text/event-stream", headers=headers)
    ended = wait_for_end(services.jobs, events, job.id, wait_cap_s(settings)) or job
    return jsonify(completion_body(ended, model)), 200, headers


def _submit(chat: ChatJob, services: Services) -> Job:
    settings: Settings = services.settings
    urls = {
        kind: [medium.as_input() for medium in media if medium.data is None]
        for kind, media in (("videos", chat.videos), ("images", chat.images))
    }
    try:
        parsed = JobRequest.parse({**chat.body, **urls}, settings)
        return submit_request(
            parsed, _in_order(chat.videos, parsed.videos, settings), _in_order(chat.images, parsed.images, settings),
            settings=settings, jobs=services.jobs, store=services.store, enqueue_ingest=services.enqueue_ingest,
            tenant=current_tenant(), idempotency=services.idempotency,
            idempotency_key=request.headers.get("Idempotency-Key"),
            video_store=services.videos, enqueue_generate=services.enqueue_generate,
        )[0]  # fmt: skip
    except ValidationError as exc:
        raise invalid(_chat_params(validation_problems(exc))) from None
    except InvalidRequest as exc:
        if isinstance(exc.details, list) and exc.details:
            raise invalid(_chat_params(exc.details)) from None
        raise


def _in_order(media: list[Medium], urls: list[Any], settings: Settings) -> list[MediaEntry]:
    """The job's media in the chat's order: inline (data:) ones as uploads, the others as parsed."""
    remaining = iter(urls)
    ordered: list[MediaEntry] = []
    for position, medium in enumerate(media):
        if medium.data is None:
            ordered.append(next(remaining))
            continue
        if len(medium.data) > settings.max_upload_bytes:
            raise PayloadTooLarge(f"a data: URL holds more than {settings.max_upload_bytes} bytes")
        extension = mimetypes.guess_extension(medium.mime or "") or ""
        ordered.append(
            FileStorage(
                io.BytesIO(medium.data), filename=f"{medium.kind}-{position}{extension}", content_type=medium.mime
            )
        )
    return ordered


def _chat_params(problems: list[dict[str, str]]) -> list[dict[str, str]]:
    renamed = []
    for problem in problems:
        field = problem.get("field", "")
        head = field.split(".", 1)[0]
        param = _PARAMS.get(field) or (
            "messages" if head in ("question", "prompt", "history", "videos", "images", "size") else field
        )
        renamed.append({**problem, "field": param})
    return renamed


def _model(model_id: str, settings: Settings) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "videoqa",
        "root": settings.model,
        "max_model_len": settings.context_tokens,
    }


@bp.get("/v1/models")
def list_models() -> Response:
    settings: Settings = current_services().settings
    return jsonify({"object": "list", "data": [_model(model_id, settings) for model_id in served_model_ids(settings)]})


@bp.get("/v1/models/<path:model_id>")
def get_model(model_id: str) -> Response:
    settings: Settings = current_services().settings
    if model_id not in served_model_ids(settings):
        raise NotFound(
            f"the model {model_id!r} does not exist; this service serves {settings.model!r}", code="model_not_found"
        )
    return jsonify(_model(model_id, settings))
