"""What the client hands back: typed views of the API's JSON, each keeping the JSON itself."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class Frame:
    """One sampled frame: the video's position in the request, its index and time in that video."""

    video: int
    index: int
    time: float

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Frame:
        return cls(video=int(body["video"]), index=int(body["index"]), time=float(body["time"]))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from an earlier job over the same frames


@dataclass(frozen=True)
class Result:
    """A succeeded job's answer."""

    job_id: str
    answer: str
    model: str
    frames: list[Frame]
    usage: Usage
    timings: dict[str, float]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, job_id: str, body: dict[str, Any]) -> Result:
        usage = body.get("usage") or {}
        return cls(
            job_id=job_id,
            answer=body["answer"],
            model=body.get("model", ""),
            frames=[Frame.from_json(frame) for frame in body.get("frames", [])],
            usage=Usage(
                int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 0)),
                int(usage.get("cached_tokens", 0)),
            ),
            timings={name: float(seconds) for name, seconds in (body.get("timings") or {}).items()},
            raw=body,
        )


@dataclass(frozen=True)
class Job:
    """A job record as ``GET /v1/jobs/{id}`` shows it."""

    id: str
    status: str
    created_at: float
    updated_at: float
    result: Result | None
    error: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Job:
        return cls(
            id=body["id"],
            status=body["status"],
            created_at=float(body.get("created_at", 0.0)),
            updated_at=float(body.get("updated_at", 0.0)),
            result=Result.from_json(body["id"], body["result"]) if body.get("result") else None,
            error=body.get("error"),
            raw=body,
        )


@dataclass(frozen=True)
class StoredVideo:
    """A stored video as ``GET /v1/videos/{id}`` shows it; jobs name it ``{"video_id": id}``."""

    id: str
    status: str
    frames: list[Frame]
    frame_count: int | None
    duration: float | None
    error: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def ref(self) -> dict[str, str]:
        """The entry naming it in a job's ``videos``."""
        return {"video_id": self.id}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> StoredVideo:
        return cls(
            id=body["id"],
            status=body["status"],
            frames=[Frame(video=0, index=int(f["index"]), time=float(f["time"])) for f in body.get("frames", [])],
            frame_count=body.get("frame_count"),
            duration=body.get("duration"),
            error=body.get("error"),
            raw=body,
        )


@dataclass(frozen=True)
class JobPage:
    """One page of ``GET /v1/jobs``, newest first; ``next_before`` asks for the next page."""

    jobs: list[Job]
    next_before: float | None


@dataclass(frozen=True)
class Event:
    """One event of ``GET /v1/jobs/{id}/events``: ``status``, ``token`` or ``done``."""

    event: str
    id: str | None
    data: Any

    @classmethod
    def from_message(cls, event: str, data: str, event_id: str | None) -> Event:
        try:
            parsed: Any = json.loads(data)
        except ValueError:
            parsed = data
        return cls(event=event, id=event_id, data=parsed)

    @property
    def text(self) -> str:
        """A ``token`` event's new text ("" for other events)."""
        return str(self.data.get("text", "")) if self.event == "token" and isinstance(self.data, dict) else ""

    @property
    def job(self) -> Job | None:
        """The record a ``status`` or ``done`` event carries."""
        if self.event in ("status", "done") and isinstance(self.data, dict) and "id" in self.data:
            return Job.from_json(self.data)
        return None
