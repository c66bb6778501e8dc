"""Request models: the single definition of what a job request may contain."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from common.job_size import job_size, size_problem
from common.settings import Settings

VIDEO_PLACEHOLDER = "<video>"
IMAGE_PLACEHOLDER = "<image>"
_URL_SCHEMES = ("http://", "https://", "s3://")
# Validation context key: the configured limit on question and prompt together.
MAX_TEXT_CHARS = "max_text_chars"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MediaInput(_Strict):
    url: str = Field(description="http(s):// or s3://bucket/key")

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.lower().startswith(_URL_SCHEMES):
            raise ValueError("must be an http://, https:// or s3:// URL")
        return value


class Sampling(_Strict):
    num_frames: int = Field(default=8, ge=1, description="frames sampled from each video")
    fps: float | None = Field(default=None, gt=0, description="one frame per 1/fps seconds instead")
    start: float | None = Field(default=None, ge=0, description="window start, seconds")
    end: float | None = Field(default=None, gt=0, description="window end, seconds")
    fast: bool = Field(
        default=False, description="take the keyframe nearest each target instead of the exact frame"
    )

    @model_validator(mode="after")
    def _window(self) -> Sampling:
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError("end must be greater than start")
        return self


class Generation(_Strict):
    max_new_tokens: int = Field(default=100, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)


# The options' names as the flat fields of a multipart form.
SAMPLING_FIELDS = tuple(Sampling.model_fields)
GENERATION_FIELDS = tuple(Generation.model_fields)

WebhookEvent = Literal["succeeded", "failed", "cancelled"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("succeeded", "failed", "cancelled")


class Webhook(_Strict):
    """Where the job's record is POSTed, signed, when it ends in one of ``events``."""

    url: str = Field(description="http:// or https://; the same address policy as video URLs applies")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS), min_length=1, description="terminal statuses to deliver"
    )

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.lower().startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("events")
    @classmethod
    def _once_each(cls, value: list[WebhookEvent]) -> list[WebhookEvent]:
        return list(dict.fromkeys(value))


class JobRequest(_Strict):
    """The body of ``POST /v1/jobs``."""

    question: str = Field(min_length=1, description="with `prompt`, at most VIDEOQA_MAX_TEXT_CHARS characters")
    videos: list[MediaInput] = Field(default_factory=list)
    images: list[MediaInput] = Field(default_factory=list)
    prompt: str | None = Field(
        default=None,
        description="text with one <video> / <image> placeholder per entry, in order; the model's special tokens "
        "written in it (or in the question) are read as text",
    )
    sampling: Sampling = Field(default_factory=Sampling)
    generation: Generation = Field(default_factory=Generation)
    webhook: Webhook | None = Field(default=None, description="signed POST of the record when the job ends")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        _check_text_length(len(value), info)
        return value

    @field_validator("prompt")
    @classmethod
    def _shares_the_text_limit(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            _check_text_length(len(value) + len(info.data.get("question") or ""), info, "with the question")
        return value

    @classmethod
    def parse(cls, body: object, settings: Settings) -> JobRequest:
        """Validate ``body`` against the configured limits on text (JSON and multipart alike)."""
        return cls.model_validate(body, context={MAX_TEXT_CHARS: settings.max_text_chars})


def _check_text_length(length: int, info: ValidationInfo, together: str = "") -> None:
    # Without a context (a request read back, say), the default applies: text is never unbounded.
    limit = (info.context or {}).get(MAX_TEXT_CHARS) or Settings.model_fields["max_text_chars"].default
    if length > limit:
        raise ValueError(f"{length} characters{' ' + together if together else ''}; at most {limit}")


class MediaSource(BaseModel):
    """Where the worker finds one video or image: a user URL or an upload in our storage."""

    kind: Literal["http", "s3", "upload"]
    location: str
    filename: str | None = None

    @classmethod
    def from_url(cls, url: str) -> MediaSource:
        return cls(kind="s3" if url.lower().startswith("s3://") else "http", location=url)


class StoredRequest(BaseModel):
    """What a job record keeps of the request: the validated body with media resolved to sources."""

    question: str
    prompt: str | None
    videos: list[MediaSource]
    images: list[MediaSource]
    sampling: Sampling
    generation: Generation
    webhook: Webhook | None = None


def check_limits(
    request: JobRequest, settings: Settings, *, uploaded_videos: int = 0, uploaded_images: int = 0
) -> list[dict[str, str]]:
    """Checks that span fields or depend on configuration, as ``{field, message}`` problems.

    Uploaded files count with the URLs: a multipart request carries its media as files.
    """
    problems: list[dict[str, str]] = []
    n_videos = len(request.videos) + uploaded_videos
    n_images = len(request.images) + uploaded_images
    if n_videos + n_images == 0:
        problems.append({"field": "videos", "message": "at least one video or image is required"})
    if request.prompt is not None:
        found_videos = request.prompt.count(VIDEO_PLACEHOLDER)
        found_images = request.prompt.count(IMAGE_PLACEHOLDER)
        if (found_videos, found_images) != (n_videos, n_images):
            problems.append(
                {
                    "field": "prompt",
                    "message": f"has {found_videos} <video> and {found_images} <image> placeholders "
                    f"for {n_videos} videos and {n_images} images",
                }
            )
    if n_videos > settings.max_videos:
        problems.append({"field": "videos", "message": f"at most {settings.max_videos} videos per job"})
    if n_images > settings.max_images:
        problems.append({"field": "images", "message": f"at most {settings.max_images} images per job"})
    if request.sampling.num_frames > settings.max_frames:
        problems.append(
            {"field": "sampling.num_frames", "message": f"at most {settings.max_frames} frames per video"}
        )
    if request.generation.max_new_tokens > settings.max_new_tokens:
        problems.append(
            {"field": "generation.max_new_tokens", "message": f"at most {settings.max_new_tokens}"}
        )
    if not settings.is_s3:
        problems += [
            {"field": f"{kind}.{position}.url", "message": "s3:// URLs need S3 storage, and this service has none"}
            for kind, items in (("videos", request.videos), ("images", request.images))
            for position, item in enumerate(items)
            if item.url.lower().startswith("s3://")
        ]
    # An upper bound: a video gives at most num_frames frames, whatever the strategy.
    frames = n_videos * request.sampling.num_frames + n_images
    size = job_size(request.question, request.prompt, frames, request.generation.max_new_tokens, settings)
    problem = size_problem(size, settings)
    if problem is not None:
        problems.append({"field": "size", "message": problem})
    return problems
