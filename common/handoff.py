"""What the CPU stage hands the GPU stage: each medium of a prepared job, with the storage keys of
its frames or image, and the seconds the ingest spent per step.

It lives in the job's record (fields ``media``, ``ingest_timings`` and ``handoff_version``) and a
video's frame entries are also its stored manifest (``.../manifest.json``), so the JSON stays as
it has always been: a record without ``handoff_version`` is version 1. A GPU worker that meets a
version newer than it reads fails that job with a message that says so, rather than guess.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from common.errors import VideoQAError

if TYPE_CHECKING:
    from common.jobs import Job

HANDOFF_VERSION = 1
# The record's field holding the version; absent on records written before it existed (version 1).
VERSION_FIELD = "handoff_version"


class HandoffUnreadable(VideoQAError):
    """The prepared job's record is not one this worker can read."""


class FrameRef(BaseModel):
    index: int
    time: float


class StoredFrame(BaseModel):
    """One sampled frame of a video, stored as a PNG under ``key``."""

    index: int  # in presentation order
    time: float  # seconds
    key: str
    # Fast mode only: seconds between this keyframe and the target it stands for.
    offset: float | None = None
    # The frame chosen, when it could not be decoded and this one stands in for it.
    stands_in_for: FrameRef | None = None


class VideoMedia(BaseModel):
    kind: Literal["video"] = "video"
    position: int  # the video's position in the request
    frames: list[StoredFrame]
    # A stored video's id (``POST /v1/videos``): its frames were sampled once, under its own keys.
    video_id: str | None = None


class ImageMedia(BaseModel):
    kind: Literal["image"] = "image"
    position: int  # the image's position in the request
    key: str


Media = Annotated[VideoMedia | ImageMedia, Field(discriminator="kind")]
_FRAMES = TypeAdapter(list[StoredFrame])


def dump_frames(frames: list[StoredFrame]) -> list[dict[str, Any]]:
    """Frame entries as stored (a manifest, a record's media): optional fields only when set."""
    return [frame.model_dump(exclude_none=True) for frame in frames]


def load_frames(entries: Any) -> list[StoredFrame]:
    """A stored manifest's frame entries."""
    return _FRAMES.validate_python(entries)


class Handoff(BaseModel):
    """A prepared job: its videos (then its images), in request order, and the ingest's timings."""

    version: int = HANDOFF_VERSION
    media: list[Media] = Field(default_factory=list)
    ingest_timings: dict[str, float] = Field(default_factory=dict)

    @property
    def videos(self) -> list[VideoMedia]:
        return [item for item in self.media if isinstance(item, VideoMedia)]

    @property
    def images(self) -> list[ImageMedia]:
        return [item for item in self.media if isinstance(item, ImageMedia)]

    @property
    def image_count(self) -> int:
        """Images the model will see: every frame of every video, and each still image."""
        return sum(len(video.frames) for video in self.videos) + len(self.images)

    def storage_keys(self) -> set[str]:
        return {frame.key for video in self.videos for frame in video.frames} | {image.key for image in self.images}

    def result_frames(self) -> list[dict[str, Any]]:
        """The sampled frames as a result shows them (``GET /v1/jobs/{id}``): no storage keys."""
        return [
            {"video": video.position, **frame.model_dump(exclude={"key"}, exclude_none=True)}
            for video in self.videos
            for frame in video.frames
        ]

    def record_fields(self) -> dict[str, Any]:
        """The job record's fields that hold the hand-off (``JobStore.transition`` stores them)."""
        return {
            "media": [item.model_dump(exclude_none=True) for item in self.media],
            "ingest_timings": self.ingest_timings,
            VERSION_FIELD: str(self.version),
        }

    @classmethod
    def of(cls, job: Job) -> Handoff:
        """The hand-off in ``job``'s record; ``HandoffUnreadable`` for a version newer than this
        code reads, or entries that do not parse."""
        if job.handoff_version > HANDOFF_VERSION:
            raise HandoffUnreadable(
                f"the job was prepared by a newer CPU worker (hand-off version {job.handoff_version}; "
                f"this worker reads up to {HANDOFF_VERSION}): run the same release on both"
            )
        try:
            return cls.model_validate(
                {"version": job.handoff_version, "media": job.media or [], "ingest_timings": job.ingest_timings}
            )
        except ValidationError as exc:
            raise HandoffUnreadable(f"the job's prepared media cannot be read: {exc.errors()[0]['msg']}") from None
