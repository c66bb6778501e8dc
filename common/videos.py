"""Stored videos in Redis: a video sampled once, its frames kept under ``videos/<id>/``, asked
about by any number of jobs through ``{"video_id": ...}``.

A record goes ``processing -> ready | failed``. Jobs that use a video are noted in a set of its
own (``claim``), in the same step that checks the video is ready, so that ``delete`` can refuse
while one of them has not ended: both are single Redis scripts, so a job is either noted before
the deletion (which then refuses) or finds the video gone.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

import redis

from common.errors import VideoQAError
from common.jobs import ACTIVE, DEFAULT_TENANT, iso8601
from common.jobs import KEY_PREFIX as JOB_KEY_PREFIX

VIDEO_KEY_PREFIX = "videoqa:video:"
# The jobs that claimed a video: a sorted set of job ids scored by when they claimed it.
VIDEO_JOBS_PREFIX = "videoqa:video-jobs:"
VIDEO_INDEX_PREFIX = "videoqa:videos:"
# Ids of the videos still processing, for the reconciler (a video whose message was lost).
PROCESSING_KEY = "videoqa:video-processing"
# Where a video's frames are stored: videos/<id>/NNNN.png.
VIDEOS_PREFIX = "videos/"
# A claim whose job record does not exist (yet) holds the video this long: the API claims a video
# before it creates the job that uses it.
CLAIM_SETTLE_S = 30.0


class VideoStatus(StrEnum):
    PROCESSING = "processing"
    READY = "ready"
    FAILED = "failed"


def frames_prefix(video_id: str) -> str:
    return f"{VIDEOS_PREFIX}{video_id}/"


def is_video_id(value: str) -> bool:
    """Ids are uuid4 hex: anything else names no video (and never reaches a Redis key)."""
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class Video:
    id: str
    tenant: str
    status: VideoStatus
    created_at: float
    updated_at: float
    expires_at: float
    source: dict[str, Any]
    sampling: dict[str, Any]
    frames: list[dict[str, Any]] = field(default_factory=list)
    frame_count: int | None = None
    duration: float | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0

    def to_public(self) -> dict[str, Any]:
        """The record as the API shows it: frame storage keys and upload keys are internal."""
        return {
            "id": self.id,
            "status": str(self.status),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "expires_at": self.expires_at,
            "created_at_iso": iso8601(self.created_at),
            "expires_at_iso": iso8601(self.expires_at),
            "source": public_source(self.source),
            "sampling": self.sampling,
            "frame_count": self.frame_count,
            "duration": self.duration,
            "frames": [
                {"n": n, "index": f["index"], "time": f["time"]}
                | ({"offset": f["offset"]} if f.get("offset") is not None else {})
                | ({"stands_in_for": f["stands_in_for"]} if f.get("stands_in_for") else {})
                for n, f in enumerate(self.frames)
            ],
            "error": self.error,
        }


def public_source(source: dict[str, Any]) -> dict[str, Any]:
    if source.get("kind") == "upload":
        return {"kind": "upload", "filename": source.get("filename")}
    return {"kind": source.get("kind"), "url": source.get("location")}


def _decode(raw: dict[str, str]) -> Video:
    loads = lambda name: json.loads(raw[name]) if raw.get(name) else None  # noqa: E731
    return Video(
        id=raw["id"],
        tenant=raw.get("tenant", DEFAULT_TENANT),
        status=VideoStatus(raw["status"]),
        created_at=float(raw["created_at"]),
        updated_at=float(raw["updated_at"]),
        expires_at=float(raw["expires_at"]),
        source=loads("source") or {},
        sampling=loads("sampling") or {},
        frames=loads("frames") or [],
        frame_count=int(raw["frame_count"]) if raw.get("frame_count") else None,
        duration=float(raw["duration"]) if raw.get("duration") else None,
        error=loads("error"),
        attempts=int(raw.get("attempts", 0)),
    )


# Only from ``processing``, only while the record exists: a video deleted while its frames were
# being sampled is not brought back.
_FINISH = """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
local fields = cjson.decode(ARGV[1])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
if fields['status'] ~= 'processing' then redis.call('SREM', KEYS[2], redis.call('HGET', KEYS[1], 'id')) end
return 1
"""

# KEYS: record, its jobs. ARGV: tenant, job id, now. The frames when the video is the tenant's and
# ready (and the job noted as using it); its status otherwise; 'missing' when there is none.
_CLAIM = """
local found = redis.call('HMGET', KEYS[1], 'tenant', 'status', 'frames')
if not found[1] or found[1] ~= ARGV[1] then return {'missing'} end
if found[2] ~= 'ready' then return {found[2]} end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return {'ready', found[3]}
"""

# KEYS: record, its jobs, the tenant's index. ARGV: tenant, job key prefix, now, settle seconds,
# active statuses (JSON). Refuses with the id of a job that claimed the video and has not ended.
_DELETE = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return {'missing'} end
local active = {}
for _, s in ipairs(cjson.decode(ARGV[5])) do active[s] = true end
local users = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #users, 2 do
  local status = redis.call('HGET', ARGV[2] .. users[i], 'status')
  if status then
    if active[status] then return {'busy', users[i]} end
  elseif tonumber(users[i + 1]) > tonumber(ARGV[3]) - tonumber(ARGV[4]) then
    return {'busy', users[i]}
  end
end
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], id)
redis.call('SREM', KEYS[4], id)
return {'deleted'}
"""


class VideoUnavailable(VideoQAError):
    """A job's stored video is gone (past retention) or not ready when its CPU stage reads it."""

    code = "video_unavailable"
    http_status = 422


class VideoInUse(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


@dataclass(frozen=True)
class Claimed:
    """What ``claim`` found: the frames of a ready video, or the status that keeps a job from it."""

    status: str  # ready, processing, failed, or missing (unknown, deleted, another tenant's)
    frames: list[dict[str, Any]] | None = None


class VideoStore:
    """All reads and writes of video records go through here."""

    def __init__(self, client: redis.Redis, *, ttl_s: int) -> None:
        """``ttl_s``: a record (and so its frames) lasts this long from its creation."""
        self._redis = client
        self._ttl_s = ttl_s
        self._finish = client.register_script(_FINISH)
        self._claim = client.register_script(_CLAIM)
        self._delete = client.register_script(_DELETE)

    @staticmethod
    def key(video_id: str) -> str:
        return VIDEO_KEY_PREFIX + video_id

    def create(
        self,
        source: dict[str, Any],
        sampling: dict[str, Any],
        *,
        tenant: str = DEFAULT_TENANT,
        video_id: str | None = None,
    ) -> Video:
        video_id = video_id or uuid.uuid4().hex
        now = time.time()
        fields = {
            "id": video_id,
            "tenant": tenant,
            "status": str(VideoStatus.PROCESSING),
            "created_at": repr(now),
            "updated_at": repr(now),
            "expires_at": repr(now + self._ttl_s),
            "source": json.dumps(source),
            "sampling": json.dumps(sampling),
            "attempts": "0",
        }
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.key(video_id), mapping=cast("dict[Any, Any]", fields)
            )  # redis-py: keys of any encodable type
            pipe.expire(self.key(video_id), self._ttl_s)
            pipe.zadd(VIDEO_INDEX_PREFIX + tenant, {video_id: now})
            pipe.sadd(PROCESSING_KEY, video_id)
            pipe.execute()
        return _decode(fields)

    def get(self, video_id: str) -> Video | None:
        if not is_video_id(video_id):
            return None
        raw = cast("dict[str, str]", self._redis.hgetall(self.key(video_id)))  # the client decodes replies
        return _decode(raw) if raw else None

    def get_for(self, video_id: str, tenant: str) -> Video | None:
        """The video when it is ``tenant``'s: another tenant's is as unknown as a missing one."""
        video = self.get(video_id)
        return video if video is not None and video.tenant == tenant else None

    def frames_for_job(self, video_id: str, tenant: str) -> list[dict[str, Any]]:
        """The frames of a ready video of ``tenant``, for a job's media; ``VideoUnavailable``
        otherwise."""
        video = self.get_for(video_id, tenant)
        if video is None:
            raise VideoUnavailable(f"video {video_id} was deleted or is past retention")
        if video.status is not VideoStatus.READY:
            raise VideoUnavailable(f"video {video_id} is {video.status}")
        return video.frames

    def _finish_with(self, video_id: str, fields: dict[str, Any]) -> bool:
        encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        encoded["updated_at"] = repr(time.time())
        return bool(self._finish(keys=[self.key(video_id), PROCESSING_KEY], args=[json.dumps(encoded)]) == 1)

    def mark_ready(self, video_id: str, frames: list[dict[str, Any]], *, frame_count: int, duration: float) -> bool:
        """False when the video is no longer processing (deleted meanwhile, or already ended)."""
        return self._finish_with(
            video_id,
            {
                "status": str(VideoStatus.READY),
                "frames": frames,
                "frame_count": str(frame_count),
                "duration": repr(duration),
            },
        )

    def touch(self, video_id: str) -> bool:
        """Refresh ``updated_at`` of a video still processing (sent again: the next scan waits)."""
        return self._finish_with(video_id, {"status": str(VideoStatus.PROCESSING)})

    def stale_processing(self, *, older_than_s: float, now: float | None = None) -> list[Video]:
        """Videos processing with no change for ``older_than_s``; ids whose record ended or
        expired leave the set."""
        now = time.time() if now is None else now
        stale = []
        for video_id in self._redis.smembers(PROCESSING_KEY):
            video_id = video_id.decode() if isinstance(video_id, bytes) else video_id
            video = self.get(video_id)
            if video is None or video.status is not VideoStatus.PROCESSING:
                self._redis.srem(PROCESSING_KEY, video_id)
            elif now - video.updated_at >= older_than_s:
                stale.append(video)
        return stale

    def fail(self, video_id: str, code: str, message: str) -> bool:
        return self._finish_with(
            video_id, {"status": str(VideoStatus.FAILED), "error": {"code": code, "message": message}}
        )

    def add_attempt(self, video_id: str) -> int:
        if not self._redis.exists(self.key(video_id)):
            return 0
        return int(self._redis.hincrby(self.key(video_id), "attempts", 1))

    def claim(self, video_id: str, tenant: str, job_id: str) -> Claimed:
        """Note ``job_id`` as using the video if it is ``tenant``'s and ready; its frames then."""
        if not is_video_id(video_id):
            return Claimed("missing")
        found = self._claim(
            keys=[self.key(video_id), VIDEO_JOBS_PREFIX + video_id], args=[tenant, job_id, repr(time.time())]
        )
        status = found[0].decode() if isinstance(found[0], bytes) else str(found[0])
        if status != "ready":
            return Claimed(status)
        raw = found[1].decode() if isinstance(found[1], bytes) else found[1]
        return Claimed("ready", json.loads(raw or "[]"))

    def delete(self, video_id: str, tenant: str) -> bool:
        """Remove the record; False when there is none of ``tenant``'s. Raises ``VideoInUse``
        while a job that uses it has not ended."""
        if not is_video_id(video_id):
            return False
        outcome = self._delete(
            keys=[self.key(video_id), VIDEO_JOBS_PREFIX + video_id, VIDEO_INDEX_PREFIX + tenant, PROCESSING_KEY],
            args=[tenant, JOB_KEY_PREFIX, repr(time.time()), CLAIM_SETTLE_S, json.dumps(sorted(map(str, ACTIVE)))],
        )
        status = [part.decode() if isinstance(part, bytes) else str(part) for part in outcome]
        if status[0] == "busy":
            raise VideoInUse(status[1])
        return status[0] == "deleted"

    def list(self, *, tenant: str, limit: int, before: float | None = None) -> list[Video]:
        """The tenant's videos, newest first; ``before`` is the last page's last ``created_at``."""
        index = VIDEO_INDEX_PREFIX + tenant
        self._redis.zremrangebyscore(index, "-inf", time.time() - self._ttl_s)
        upper = f"({before}" if before is not None else "+inf"
        ids = cast(
            "list[str]", self._redis.zrevrangebyscore(index, upper, "-inf", start=0, num=limit)
        )  # decoded replies
        with self._redis.pipeline(transaction=False) as pipe:
            for video_id in ids:
                pipe.hgetall(self.key(video_id))
            raws = pipe.execute()
        return [_decode(raw) for raw in raws if raw]
