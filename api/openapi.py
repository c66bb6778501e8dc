"""The OpenAPI 3.1 description of the API, built from the pydantic models that validate requests.

Request bodies come from ``common.schemas`` (the JSON body is ``JobRequest`` itself; the multipart
form is its fields flattened, as ``api.submission`` parses it). Responses are described by the view
models below; the tests validate real responses against them, so they cannot drift from the routes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from api.idempotency import MAX_KEY_CHARS
from api.openapi_chat import VIEWS as CHAT_VIEWS
from api.openapi_chat import chat_operations
from api.pagination import PAGE_PARAMETERS
from api.submission import GENERATION_FIELDS, SAMPLING_FIELDS
from api.waiting import MAX_WAIT_S
from common.jobs import JobStatus
from common.schemas import WEBHOOK_EVENTS, Generation, JobRequest, Sampling, StoredRequest, Webhook

REF = "#/components/schemas/{model}"


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_View):
    field: str
    message: str


class ErrorInfo(_View):
    code: str = Field(description="stable, documented error code")
    message: str
    details: list[ErrorDetail] | None = None


class ErrorResponse(_View):
    error: ErrorInfo


class FrameRef(_View):
    index: int = Field(description="frame index in presentation order")
    time: float = Field(description="timestamp in seconds")


class SampledFrame(_View):
    video: int = Field(description="position of the video in the request")
    index: int = Field(description="frame index in presentation order")
    time: float = Field(description="timestamp in seconds")
    offset: float | None = Field(
        default=None, description="fast mode: seconds between the keyframe taken and the target time"
    )
    stands_in_for: FrameRef | None = Field(
        default=None,
        description="present when the frame chosen cannot be decoded (damaged, or depending on frames the file "
        "does not hold): that frame, for which this one, the first decodable after it, stands in",
    )


class Usage(_View):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(
        default=0,
        description="prompt tokens whose keys and values were reused from an earlier job over the same frames",
    )


class JobResult(_View):
    answer: str
    model: str
    frames: list[SampledFrame]
    usage: Usage
    finish_reason: Literal["stop", "length"] | None = Field(
        default=None, description="stop: the model ended its answer; length: max_new_tokens did"
    )
    timings: dict[str, float] = Field(description="seconds per stage, in pipeline order, and the total")
    batch_size: int | None = Field(default=None, description="jobs generated together with this one, itself included")


class StageTimes(_View):
    start: float | None = None
    end: float | None = None
    seconds: float | None = None


class WebhookState(_View):
    attempts: int = Field(description="deliveries tried so far")
    last_status: int | None = Field(description="HTTP status of the last answer; null when none came")
    last_error: str | None = Field(description="why the last attempt failed; null after a delivery")
    delivered_at: float | None = Field(description="when a 2xx answer came; null until then")


class JobView(_View):
    id: str
    tenant: str
    status: JobStatus
    created_at: float = Field(description="seconds since the epoch")
    updated_at: float
    created_at_iso: str = Field(description="`created_at` in ISO 8601 (UTC)")
    updated_at_iso: str
    attempts: int
    request: StoredRequest
    result: JobResult | None
    error: ErrorInfo | None
    stages: dict[str, StageTimes]
    webhook: WebhookState | None = Field(description="delivery of the job's webhook; null when it asked for none")
    links: dict[str, str]


class JobPage(_View):
    jobs: list[JobView]
    next_before: float | None = Field(description="pass as `before` for the next page; null on the last")


class Health(_View):
    status: Literal["ok"]


class Readiness(_View):
    status: Literal["ready", "not_ready"]
    reasons: list[str] = Field(description="why the service is not ready; empty when it is")
    checks: dict[str, Any] = Field(description="redis, storage and gpu_workers")


def _multipart_schema() -> dict[str, Any]:
    """The multipart form: files in ``videos``/``images``, the JSON body's options as flat fields."""
    body = JobRequest.model_json_schema(ref_template=REF)["properties"]
    sampling = Sampling.model_json_schema(ref_template=REF)["properties"]
    generation = Generation.model_json_schema(ref_template=REF)["properties"]
    files = {"type": "array", "items": {"type": "string", "contentMediaType": "application/octet-stream"}}
    properties: dict[str, Any] = {
        "question": body["question"],
        "prompt": body["prompt"],
        "videos": {**files, "description": "video files, repeatable"},
        "images": {**files, "description": "image files, repeatable"},
    }
    properties.update({name: sampling[name] for name in SAMPLING_FIELDS})
    properties.update({name: generation[name] for name in GENERATION_FIELDS})
    webhook = Webhook.model_json_schema(ref_template=REF)["properties"]
    properties["webhook_url"] = webhook["url"]
    properties["webhook_events"] = {
        "type": "string",
        "description": f"comma-separated, or repeated; default all of {', '.join(WEBHOOK_EVENTS)}",
    }
    return {"type": "object", "required": ["question"], "properties": properties, "additionalProperties": False}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=ref)}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json("ErrorResponse")}


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
WAIT_SCHEMA = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT_S}
PREFER = {
    "name": "Prefer",
    "in": "header",
    "schema": {"type": "string", "examples": ["wait=30"]},
    "description": f"`wait=N` (0 < N <= {MAX_WAIT_S}): answer once the job ended (200) or after N s (202)",
}
LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "schema": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"},
    "description": "the id of the last event received: the stream resumes after it",
}
EVENT_STREAM = (
    "Server-Sent Events, each with an `id:`. `status`: the job record, at once and on each change of "
    'status; `token`: `{"text": ...}`, the answer\'s new text as it is generated (all of them '
    "concatenate to the answer); `done`: the final record, after which the stream ends. Comment "
    "lines keep an idle stream open."
)
# Either no credentials (authentication off) or a bearer API key.
BEARER: list[dict[str, list[str]]] = [{}, {"bearerAuth": []}]


def _operations() -> dict[str, dict[str, Any]]:
    # Imported here: that module builds on this one's helpers.
    from api.openapi_videos import video_operations

    job = {"description": "the job", "content": _json("JobView")}
    common_errors = {
        "401": _error("missing or unknown API key (when keys are configured)"),
        "503": _error("Redis or storage unavailable"),
    }
    return {
        "/v1/jobs": {
            "post": {
                "operationId": "createJob",
                "summary": "Submit a question about videos (JSON with URLs, or multipart with files)",
                "security": BEARER,
                "parameters": [
                    PREFER,
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS},
                        "description": "the same key with the same request (per API key, for "
                        "VIDEOQA_IDEMPOTENCY_TTL_S) answers with the job the first one created",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        **_json("JobRequest"),
                        "multipart/form-data": {"schema": _multipart_schema()},
                    },
                },
                "responses": {
                    "200": {
                        **job,
                        "description": "with `Prefer: wait=N`: the job ended within N s",
                        "headers": {
                            "Location": {"schema": {"type": "string"}, "description": "the job's URL"},
                            "Preference-Applied": {"schema": {"type": "string"}, "description": "`wait=N`"},
                        },
                    },
                    "202": {
                        **job,
                        "description": "accepted; poll the Location (with `Prefer: wait=N`: not ended after N s)",
                        "headers": {
                            "Location": {"schema": {"type": "string"}, "description": "the job's URL"},
                            "Idempotent-Replayed": {
                                "schema": {"type": "string", "enum": ["true"]},
                                "description": "the job an earlier request with this Idempotency-Key created",
                            },
                            "Preference-Applied": {
                                "schema": {"type": "string"},
                                "description": "`wait=N`, when that preference was sent",
                            },
                        },
                    },
                    "400": _error(
                        "invalid request; `details` names each bad field (`size`: the job's estimate in tokens "
                        "and the limit it exceeds)"
                    ),
                    "409": _error("a request with this Idempotency-Key is still being handled"),
                    "413": _error("body over VIDEOQA_MAX_UPLOAD_BYTES"),
                    "422": _error("`idempotency_conflict`: this Idempotency-Key was used with another request"),
                    "429": _error("rate limit, or too many active jobs for this key"),
                    **common_errors,
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "Recent jobs, newest first",
                "security": BEARER,
                "parameters": [
                    *PAGE_PARAMETERS,
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "only jobs in these statuses, comma-separated (e.g. `succeeded,failed`)",
                    },
                ],
                "responses": {
                    "200": {"description": "one page", "content": _json("JobPage")},
                    "400": _error("bad limit, before or status"),
                    **common_errors,
                },
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "operationId": "getJob",
                "summary": "A job: status, stage times, result or error",
                "security": BEARER,
                "parameters": [
                    JOB_ID,
                    {
                        "name": "wait",
                        "in": "query",
                        "schema": WAIT_SCHEMA,
                        "description": "answer once the job ended, or after this many seconds as it is then",
                    },
                ],
                "responses": {
                    "200": job,
                    "400": _error("bad wait"),
                    "404": _error("unknown, expired, or another tenant's"),
                    **common_errors,
                },
            },
            "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel: a queued job never runs; a running generation stops within a second",
                "security": BEARER,
                "parameters": [JOB_ID],
                "responses": {
                    "200": job,
                    "404": _error("unknown, expired, or another tenant's"),
                    "409": _error("the job already ended"),
                    **common_errors,
                },
            },
        },
        "/v1/jobs/{job_id}/events": {
            "get": {
                "operationId": "jobEvents",
                "summary": "A job's events as they happen, from its start or after Last-Event-ID",
                "security": BEARER,
                "parameters": [JOB_ID, LAST_EVENT_ID],
                "responses": {
                    "200": {
                        "description": EVENT_STREAM,
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "400": _error("Last-Event-ID is not an event id"),
                    "404": _error("unknown, expired, or another tenant's"),
                    **common_errors,
                },
            }
        },
        **video_operations(common_errors),
        "/v1/jobs/{job_id}/frames/{n}": {
            "get": {
                "operationId": "jobFrame",
                "summary": "One sampled frame of a job, as stored for the model (PNG)",
                "security": BEARER,
                "parameters": [
                    JOB_ID,
                    {
                        "name": "n",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9]{1,6}$"},
                        "description": "the frame's position in `result.frames`, from 0",
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the frame",
                        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    "400": _error("n is not a whole number"),
                    "404": _error("unknown job, not ingested yet, no such frame, or past retention"),
                    **common_errors,
                },
            }
        },
        "/": {
            "get": {
                "operationId": "page",
                "summary": "The web page: ask about videos, watch the answer stream in",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            }
        },
        "/assets/{name}": {
            "get": {
                "operationId": "pageAsset",
                "summary": "The page's scripts, style sheet and icon",
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "the file", "content": {"*/*": {"schema": {"type": "string"}}}},
                    "404": _error("no such file"),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "The process is up",
                "responses": {"200": {"description": "up", "content": _json("Health")}},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readiness",
                "summary": "Redis and storage reachable and at least one GPU worker ready",
                "responses": {
                    "200": {"description": "ready", "content": _json("Readiness")},
                    "503": {"description": "not ready; `reasons` says why", "content": _json("Readiness")},
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics, the same from every API process",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/docs": {
            "get": {
                "operationId": "docs",
                "summary": "This document as a page",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            }
        },
    }


def build_spec(version: str) -> dict[str, Any]:
    from api.openapi_videos import VIDEO_MODELS

    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (JobRequest, "validation"),
        (JobView, "serialization"),
        (JobPage, "serialization"),
        *VIDEO_MODELS,
        (ErrorResponse, "serialization"),
        (Health, "serialization"),
        (Readiness, "serialization"),
        *((view, "serialization") for view in CHAT_VIEWS),
    ]
    _, definitions = models_json_schema(models, ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "videoqa",
            "version": version,
            "description": "Ask questions about videos: submit a job, poll it for the answer.",
        },
        "paths": {**_operations(), **chat_operations(BEARER)},
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key; required only when VIDEOQA_API_KEYS is set",
                }
            },
        },
    }
