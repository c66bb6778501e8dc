"""Request models: the single definition of what a job request may contain."""

from __future__ import annotations

from collections.abc import Sequence
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
    """One video or image: exactly one of ``url`` and ``video_id``."""

    url: str | None = Field(default=None, description="http(s):// or s3://bucket/key")
    video_id: str | None = Field(
        default=None,
        description="a stored video (`POST /v1/videos`) that is ready: its frames are used as sampled then, "
        "with no download and no decode; videos only",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().startswith(_URL_SCHEMES):
            raise ValueError("must be an http://, https:// or s3:// URL")
        return value

    @field_validator("video_id")
    @classmethod
    def _video_id(cls, value: str | None) -> str | None:
        if value is not None and not (len(value) == 32 and all(c in "0123456789abcdef" for c in value)):
            raise ValueError("is not a video id (32 lowercase hex digits, as POST /v1/videos answers)")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> MediaInput:
        if (self.url is None) == (self.video_id is None):
            raise ValueError("give exactly one of url and video_id")
        return self


class Sampling(_Strict):
    num_frames: int = Field(default=8, ge=1, description="frames sampled from each video")
    fps: float | None = Field(default=None, gt=0, description="one frame per 1/fps seconds instead")
    start: float | None = Field(default=None, ge=0, description="window start, seconds")
    end: float | None = Field(default=None, gt=0, description="window end, seconds")
    fast: bool = Field(default=False, description="take the keyframe nearest each target instead of the exact frame")

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


class Turn(_Strict):
    """One earlier turn of the conversation a job continues."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(
        description="the turn's text; in user turns, <video> / <image> placeholders take the job's next video / image"
    )


def placeholder_counts(text: str) -> tuple[int, int]:
    """The ``<video>`` and ``<image>`` placeholders in ``text``."""
    return text.count(VIDEO_PLACEHOLDER), text.count(IMAGE_PLACEHOLDER)


def places_media(prompt: str | None, history: Sequence[Turn]) -> bool:
    """Whether placeholders say where the job's media go: with a ``prompt``, or when a user turn of
    the history holds one. Otherwise every video and image goes into the job's own turn, first."""
    return prompt is not None or any(turn.role == "user" and any(placeholder_counts(turn.content)) for turn in history)


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
    history: list[Turn] = Field(
        default_factory=list,
        description="earlier turns, oldest first, before this job's own (question and prompt); their text counts "
        "in VIDEOQA_MAX_TEXT_CHARS; see docs/conversations.md for where the media go",
    )
    webhook: Webhook | None = Field(default=None, description="signed POST of the record when the job ends")
    parent: str | None = Field(
        default=None,
        description="a succeeded job of the same API key: ask again over its media (no videos, images or prompt here)",
    )

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

    @field_validator("history")
    @classmethod
    def _history_shares_the_text_limit(cls, value: list[Turn], info: ValidationInfo) -> list[Turn]:
        if value:
            own = len(info.data.get("question") or "") + len(info.data.get("prompt") or "")
            _check_text_length(own + sum(len(turn.content) for turn in value), info, "with the question and prompt")
        return value

    @field_validator("images")
    @classmethod
    def _images_by_url(cls, value: list[MediaInput]) -> list[MediaInput]:
        if any(item.video_id is not None for item in value):
            raise ValueError("images take a url; video_id names a stored video and belongs in videos")
        return value

    @model_validator(mode="after")
    def _follow_up_alone(self) -> JobRequest:
        if self.parent is not None and (self.videos or self.images or self.prompt is not None or self.history):
            raise ValueError(
                "a follow-up (parent) asks about its parent's media and turns: give no videos, images, prompt or history"
            )
        return self

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
    """Where the worker finds one video or image: a user URL, an upload in our storage, or a stored
    video (``location`` is its id)."""

    kind: Literal["http", "s3", "upload", "video"]
    location: str
    filename: str | None = None

    @classmethod
    def from_url(cls, url: str) -> MediaSource:
        return cls(kind="s3" if url.lower().startswith("s3://") else "http", location=url)

    @classmethod
    def from_input(cls, item: MediaInput) -> MediaSource:
        """A request's entry: its URL, or the stored video it names."""
        if item.video_id is not None:
            return cls(kind="video", location=item.video_id)
        assert item.url is not None  # MediaInput holds exactly one of the two
        return cls.from_url(item.url)


class StoredRequest(BaseModel):
    """What a job record keeps of the request: the validated body with media resolved to sources."""

    question: str
    prompt: str | None
    videos: list[MediaSource]
    images: list[MediaSource]
    sampling: Sampling
    generation: Generation
    webhook: Webhook | None = None
    parent: str | None = None
    # Absent from records written before conversations existed.
    history: list[Turn] = Field(default_factory=list)

    def user_turn(self) -> Turn:
        """This job's own turn as a history entry renders it: what a follow-up puts, with the answer
        as an assistant turn, after this job's history (docs/conversations.md)."""
        if self.prompt is not None:
            return Turn(role="user", content=f"{self.prompt}\n{self.question}")
        if places_media(None, self.history):
            return Turn(role="user", content=self.question)
        media = VIDEO_PLACEHOLDER * len(self.videos) + IMAGE_PLACEHOLDER * len(self.images)
        return Turn(role="user", content=f"{media}\n{self.question}" if media else self.question)


class VideoRequest(_Strict):
    """The JSON body of ``POST /v1/videos``: a video to sample once and keep."""

    url: str = Field(description="http(s):// or s3://bucket/key")
    sampling: Sampling = Field(default_factory=Sampling)

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.lower().startswith(_URL_SCHEMES):
            raise ValueError("must be an http://, https:// or s3:// URL")
        return value


def check_limits(
    request: JobRequest,
    settings: Settings,
    *,
    uploaded_videos: int = 0,
    uploaded_images: int = 0,
    stored_frames: int | None = None,
) -> list[dict[str, str]]:
    """Checks that span fields or depend on configuration, as ``{field, message}`` problems.

    Uploaded files count with the URLs: a multipart request carries its media as files.
    ``stored_frames``: the frames of the stored videos it names (or of its parent's media), once
    known; None before (their frames are not counted in the size then).
    """
    problems: list[dict[str, str]] = []
    n_videos = len(request.videos) + uploaded_videos
    n_images = len(request.images) + uploaded_images
    if request.parent is not None:
        n_videos = n_images = 0  # its parent's media passed these checks; only the size is checked below
    elif n_videos + n_images == 0:
        problems.append({"field": "videos", "message": "at least one video or image is required"})
    if request.parent is None:
        # A follow-up's turns come from its parent, whose placeholders matched its media.
        problems += _placeholder_problems(request, n_videos, n_images)
    if n_videos > settings.max_videos:
        problems.append({"field": "videos", "message": f"at most {settings.max_videos} videos per job"})
    if n_images > settings.max_images:
        problems.append({"field": "images", "message": f"at most {settings.max_images} images per job"})
    if request.sampling.num_frames > settings.max_frames:
        problems.append({"field": "sampling.num_frames", "message": f"at most {settings.max_frames} frames per video"})
    if request.generation.max_new_tokens > settings.max_new_tokens:
        problems.append({"field": "generation.max_new_tokens", "message": f"at most {settings.max_new_tokens}"})
    if not settings.is_s3:
        problems += [
            {"field": f"{kind}.{position}.url", "message": "s3:// URLs need S3 storage, and this service has none"}
            for kind, items in (("videos", request.videos), ("images", request.images))
            for position, item in enumerate(items)
            if item.url is not None and item.url.lower().startswith("s3://")
        ]
    # An upper bound: a video gives at most num_frames frames, whatever the strategy; a stored
    # video gives the frames it holds.
    sampled_videos = uploaded_videos + sum(1 for item in request.videos if item.url is not None)
    frames = sampled_videos * request.sampling.num_frames + n_images + (stored_frames or 0)
    size = job_size(
        request.question, request.prompt, frames, request.generation.max_new_tokens, settings,
        history=[turn.content for turn in request.history],
    )  # fmt: skip
    problem = size_problem(size, settings)
    if problem is not None:
        problems.append({"field": "size", "message": problem})
    return problems


def _placeholder_problems(request: JobRequest, n_videos: int, n_images: int) -> list[dict[str, str]]:
    """With placeholders, one per video and image: across the history's user turns, then the prompt."""
    if not places_media(request.prompt, request.history):
        return []
    in_history = [placeholder_counts(turn.content) for turn in request.history if turn.role == "user"]
    found_videos = sum(videos for videos, _ in in_history)
    found_images = sum(images for _, images in in_history)
    if request.prompt is not None:
        found_videos += request.prompt.count(VIDEO_PLACEHOLDER)
        found_images += request.prompt.count(IMAGE_PLACEHOLDER)
    if (found_videos, found_images) == (n_videos, n_images):
        return []
    counts = (
        f"{found_videos} <video> and {found_images} <image> placeholders for {n_videos} videos and {n_images} images"
    )
    if not any(videos or images for videos, images in in_history):
        return [{"field": "prompt", "message": f"has {counts}"}]
    holders = "the history's user turns" + (" and the prompt" if request.prompt is not None else "")
    return [{"field": "history", "message": f"{holders} have {counts}"}]
