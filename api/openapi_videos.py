"""The OpenAPI description of stored videos (``/v1/videos``): their view models and operations,
joined to the rest of the document by ``api.openapi``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from api.idempotency import MAX_KEY_CHARS
from api.openapi import BEARER, REF, WAIT_SCHEMA, ErrorInfo, FrameRef, _error, _json, _View
from api.pagination import PAGE_PARAMETERS
from api.submission import SAMPLING_FIELDS
from common.schemas import Sampling, VideoRequest
from common.videos import VideoStatus


class StoredFrame(_View):
    n: int = Field(description="position among the sampled frames: GET /v1/videos/{id}/frames/{n}")
    index: int = Field(description="frame index in presentation order")
    time: float = Field(description="timestamp in seconds")
    offset: float | None = Field(default=None, description="fast mode: seconds between the keyframe and its target")
    stands_in_for: FrameRef | None = None
    url: str = Field(description="the frame as an image")


class VideoSource(_View):
    kind: Literal["http", "s3", "upload"]
    url: str | None = Field(default=None, description="the URL it was read from")
    filename: str | None = Field(default=None, description="the uploaded file's name")


class VideoView(_View):
    id: str = Field(description='use as `{"video_id": id}` in a job\'s `videos`')
    status: VideoStatus
    created_at: float = Field(description="seconds since the epoch")
    updated_at: float
    expires_at: float = Field(description="the record and its frames are deleted then (VIDEOQA_STORAGE_RETENTION_S)")
    created_at_iso: str
    expires_at_iso: str
    source: VideoSource
    sampling: Sampling
    frame_count: int | None = Field(description="frames in the video stream; null until ready")
    duration: float | None = Field(description="seconds from the first frame to the last; null until ready")
    frames: list[StoredFrame] = Field(description="the sampled frames; empty until ready")
    error: ErrorInfo | None
    links: dict[str, str]


class VideoPage(_View):
    videos: list[VideoView]
    next_before: float | None = Field(description="pass as `before` for the next page; null on the last")


def _video_multipart_schema() -> dict[str, Any]:
    """``POST /v1/videos`` as a form: the file in ``video``, the sampling options as flat fields."""
    sampling = Sampling.model_json_schema(ref_template=REF)["properties"]
    properties: dict[str, Any] = {
        "video": {"type": "string", "contentMediaType": "application/octet-stream", "description": "the video file"}
    }
    properties.update({name: sampling[name] for name in SAMPLING_FIELDS})
    return {"type": "object", "required": ["video"], "properties": properties, "additionalProperties": False}


VIDEO_ID = {"name": "video_id", "in": "path", "required": True, "schema": {"type": "string"}}


def video_operations(common_errors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    video = {"description": "the video", "content": _json("VideoView")}
    missing = _error("unknown, deleted, past retention, or another tenant's")
    return {
        "/v1/videos": {
            "post": {
                "operationId": "createVideo",
                "summary": "Store a video: its frames are sampled once, then jobs name it by `video_id`",
                "security": BEARER,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS},
                        "description": "the same key with the same request answers with the video the first one created",
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {**_json("VideoRequest"), "multipart/form-data": {"schema": _video_multipart_schema()}},
                },
                "responses": {
                    "202": {
                        **video,
                        "description": "accepted, `processing`; poll the Location (`?wait=N`)",
                        "headers": {"Location": {"schema": {"type": "string"}, "description": "the video's URL"}},
                    },
                    "400": _error("invalid request; `details` names each bad field"),
                    "413": _error("body over VIDEOQA_MAX_UPLOAD_BYTES"),
                    "422": _error("`idempotency_conflict`: this Idempotency-Key was used with another request"),
                    "429": _error("rate limit"),
                    **common_errors,
                },
            },
            "get": {
                "operationId": "listVideos",
                "summary": "This API key's stored videos, newest first",
                "security": BEARER,
                "parameters": [
                    *PAGE_PARAMETERS,
                ],
                "responses": {
                    "200": {"description": "one page", "content": _json("VideoPage")},
                    "400": _error("bad limit or before"),
                    **common_errors,
                },
            },
        },
        "/v1/videos/{video_id}": {
            "get": {
                "operationId": "getVideo",
                "summary": "A stored video: status, sampled frames with timestamps, expiry",
                "security": BEARER,
                "parameters": [
                    VIDEO_ID,
                    {
                        "name": "wait",
                        "in": "query",
                        "schema": WAIT_SCHEMA,
                        "description": "answer once it is no longer processing, or after this many seconds",
                    },
                ],
                "responses": {"200": video, "400": _error("bad wait"), "404": missing, **common_errors},
            },
            "delete": {
                "operationId": "deleteVideo",
                "summary": "Delete the video and its frames (refused while a job that uses it runs)",
                "security": BEARER,
                "parameters": [VIDEO_ID],
                "responses": {
                    "204": {"description": "deleted"},
                    "404": missing,
                    "409": _error("`video_in_use`: a job that uses it has not ended"),
                    **common_errors,
                },
            },
        },
        "/v1/videos/{video_id}/frames/{n}": {
            "get": {
                "operationId": "getVideoFrame",
                "summary": "One sampled frame as an image, as the model sees it",
                "security": BEARER,
                "parameters": [VIDEO_ID, {"name": "n", "in": "path", "required": True, "schema": {"type": "integer"}}],
                "responses": {
                    "200": {"description": "the frame", "content": {"image/png": {"schema": {"type": "string"}}}},
                    "304": {"description": "unchanged since the ETag sent in If-None-Match"},
                    "404": _error("no such video, or no frame n"),
                    **common_errors,
                },
            }
        },
    }


VIDEO_MODELS: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
    (VideoRequest, "validation"),
    (VideoView, "serialization"),
    (VideoPage, "serialization"),
]
