"""Media a job takes from what is stored already: videos named by ``video_id`` and the media of a
``parent`` job. Their frames go to the job's record at submission; a job whose media are all stored
skips the CPU stage and goes straight to the GPU queue."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.errors import Conflict, InvalidRequest, NotFound
from common.jobs import Job, JobStatus, JobStore
from common.schemas import JobRequest, MediaSource, StoredRequest, Turn
from common.storage import ObjectStore
from common.videos import Claimed, Video, VideoStatus, VideoStore


class VideoNotReady(InvalidRequest):
    code = "video_not_ready"


class ParentNotUsable(Conflict):
    code = "parent_not_usable"


@dataclass
class StoredMedia:
    """What a job takes from storage: the frames of the stored videos it names (by id, as they were
    when checked or claimed), or the parent it follows."""

    frames_by_video: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    parent: Job | None = None

    @property
    def parent_request(self) -> StoredRequest | None:
        return StoredRequest.model_validate(self.parent.request) if self.parent is not None else None

    @property
    def frame_count(self) -> int:
        """Frames the job will hold from storage (each image of a parent counts one)."""
        if self.parent is not None:
            return sum(len(item.get("frames", [])) or 1 for item in self.parent.media or [])
        return sum(len(frames) for frames in self.frames_by_video.values())

    def media_of(self, videos: list[MediaSource], images: list[MediaSource]) -> list[dict[str, Any]] | None:
        """The job's media when every frame is stored already (a follow-up, or only stored videos);
        None when the CPU stage has work to do."""
        if self.parent is not None:
            return list(self.parent.media or [])
        if images or not videos or any(source.kind != "video" for source in videos):
            return None
        return [
            {
                "kind": "video",
                "position": position,
                "frames": self.frames_by_video[source.location],
                "video_id": source.location,
            }
            for position, source in enumerate(videos)
        ]


def _not_ready_problem(field_name: str, video_id: str, status: str, video: Video | None) -> dict[str, str]:
    if status == VideoStatus.PROCESSING:
        message = f"video {video_id} is still processing; ask once it is ready (GET /v1/videos/{video_id}?wait=N)"
    elif status == VideoStatus.FAILED and video is not None and video.error:
        message = f"video {video_id} failed ({video.error.get('code')}): {video.error.get('message')}"
    else:
        message = f"video {video_id} is {status}"
    return {"field": field_name, "message": message}


def _check_claims(claims: dict[int, tuple[str, Claimed]], videos: VideoStore, tenant: str) -> None:
    missing = [
        {
            "field": f"videos.{position}.video_id",
            "message": f"no video {video_id!r} (unknown, deleted, or past retention)",
        }
        for position, (video_id, claimed) in claims.items()
        if claimed.status == "missing"
    ]
    if missing:
        raise NotFound("; ".join(p["message"] for p in missing), details=missing)
    not_ready = [
        _not_ready_problem(f"videos.{position}.video_id", video_id, claimed.status, videos.get_for(video_id, tenant))
        for position, (video_id, claimed) in claims.items()
        if claimed.status != "ready"
    ]
    if not_ready:
        raise VideoNotReady("; ".join(p["message"] for p in not_ready), details=not_ready)


def names_stored_media(parsed: JobRequest) -> bool:
    return parsed.parent is not None or any(item.video_id is not None for item in parsed.videos)


def peek(
    parsed: JobRequest, *, tenant: str, videos: VideoStore | None, jobs: JobStore, store: ObjectStore
) -> StoredMedia:
    """Check what the request names without claiming it (before limits are checked): 404 for
    videos or a parent this tenant does not have, 400 for videos not ready, 409 for a parent that
    did not succeed or whose media are gone. Nothing to check: an empty ``StoredMedia``."""
    if not names_stored_media(parsed):
        return StoredMedia()
    if videos is None:
        raise InvalidRequest("this service keeps no stored videos: name videos by url")
    if parsed.parent is not None:
        return StoredMedia(parent=_usable_parent(parsed.parent, tenant=tenant, jobs=jobs, videos=videos, store=store))
    found: dict[int, tuple[str, Claimed]] = {}
    for position, item in enumerate(parsed.videos):
        if item.video_id is None:
            continue
        video = videos.get_for(item.video_id, tenant)
        if video is None:
            found[position] = (item.video_id, Claimed("missing"))
        else:
            found[position] = (item.video_id, Claimed(str(video.status), video.frames))
    _check_claims(found, videos, tenant)
    return StoredMedia(frames_by_video={video_id: claimed.frames or [] for video_id, claimed in found.values()})


def claim(
    parsed: JobRequest, stored: StoredMedia, *, job_id: str, tenant: str, videos: VideoStore | None
) -> StoredMedia:
    """Note ``job_id`` as using each stored video it names (their deletion waits for its end); the
    frames as they are now. Raises as ``peek`` when a video went away meanwhile."""
    if videos is None or not names_stored_media(parsed):
        return stored
    video_ids: dict[int, str] = {}
    if stored.parent_request is not None:
        video_ids = {p: s.location for p, s in enumerate(stored.parent_request.videos) if s.kind == "video"}
    else:
        video_ids = {p: item.video_id for p, item in enumerate(parsed.videos) if item.video_id is not None}
    claims = {position: (video_id, videos.claim(video_id, tenant, job_id)) for position, video_id in video_ids.items()}
    if stored.parent is not None:
        gone = [video_id for video_id, claimed in claims.values() if claimed.status != "ready"]
        if gone:
            raise ParentNotUsable(f"job {stored.parent.id} used video {gone[0]}, which was deleted or expired since")
        return stored
    _check_claims(claims, videos, tenant)
    return StoredMedia(frames_by_video={video_id: claimed.frames or [] for video_id, claimed in claims.values()})


def _usable_parent(parent_id: str, *, tenant: str, jobs: JobStore, videos: VideoStore, store: ObjectStore) -> Job:
    parent = jobs.get(parent_id) if parent_id.isalnum() else None
    if parent is None or parent.tenant != tenant:
        raise NotFound(
            f"no job {parent_id!r} to follow up (unknown, or past retention)",
            details=[{"field": "parent", "message": "no such job"}],
        )
    if parent.status is not JobStatus.SUCCEEDED:
        if parent.status.terminal:
            message = f"job {parent_id} ended as {parent.status}: only a succeeded job can be followed up"
        else:
            message = f"job {parent_id} is {parent.status}: ask the follow-up once it succeeded"
        raise ParentNotUsable(message, details=[{"field": "parent", "message": message}])
    request = StoredRequest.model_validate(parent.request)
    for source in request.videos:
        if source.kind == "video" and videos.get_for(source.location, tenant) is None:
            message = f"job {parent_id} used video {source.location}, which was deleted or expired since"
            raise ParentNotUsable(message, details=[{"field": "parent", "message": message}])
    # Frames sampled for a URL or an upload are shared, and kept for the retention only.
    if any(not store.exists(key) for key in _media_keys(parent)):
        message = f"the frames of job {parent_id} are past retention: submit its media again"
        raise ParentNotUsable(message, details=[{"field": "parent", "message": message}])
    return parent


def _media_keys(job: Job) -> list[str]:
    keys: list[str] = []
    for item in job.media or []:
        frames = item.get("frames") or []
        # The first and last of each video: frames of one video are stored and expire together.
        keys += [frame["key"] for frame in frames[:1] + frames[-1:]] if frames else []
        if "key" in item:
            keys.append(item["key"])
    return keys


def follow_up_history(stored: StoredMedia) -> list[Turn]:
    """A follow-up's earlier turns: its parent's, then the parent's own question (with the
    placeholders that say where the media go) and its answer."""
    assert stored.parent is not None and stored.parent_request is not None
    answer = str((stored.parent.result or {}).get("answer", ""))
    parent = stored.parent_request
    return [*parent.history, parent.user_turn(), Turn(role="assistant", content=answer)]
