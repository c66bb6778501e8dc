"""Deletes what storage and the job indexes would otherwise keep for ever.

Rules (docs/retention.md explains them):

- An upload (``uploads/<job id>/...``) goes once its job is no longer live (ended, expired, or
  never created because Redis refused the record) and the upload is older than
  ``UPLOAD_GRACE_S``, which covers the moments between storing a request's files and creating
  its record.
- Everything else under the storage prefix (frames, still images, ETag records, anything an
  operator put there) goes once it is older than the retention.
- Nothing a live job names (its uploads, its frames and images) is ever deleted; worker.cpu.frame_store
  makes sure a job only picks up objects that outlive the moment its record names them.
- A stored video's frames (``videos/<id>/...``) and upload stay while its record exists (or a
  live job names it), and go once neither is so and they are older than ``UPLOAD_GRACE_S``.
- Entries of the job indexes (all jobs, each tenant's) go with their records.

On S3 the bucket also gets a lifecycle rule, a backstop that keeps working when no CPU worker
runs; it is set well past any live job's objects (the retention plus the records' lifetime).
Every CPU worker runs ``sweep`` on a timer; a Redis lock lets one run at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import cast

import redis

from common.jobs import ACTIVE_PREFIX, INDEX_KEY, KEY_PREFIX, TENANT_INDEX_PREFIX, Job, JobStore
from common.storage import UPLOADS_PREFIX, ObjectStore, StoredObject
from common.videos import VIDEO_KEY_PREFIX, VIDEOS_PREFIX

log = logging.getLogger(__name__)

LOCK_KEY = "videoqa:sweeper:lock"
UPLOAD_GRACE_S = 3600.0
_DAY_S = 24 * 3600
_PAGE = 200


@dataclass(frozen=True)
class SweepOutcome:
    deleted: int
    live_jobs: int
    index_entries_removed: int
    expiration_rule: bool


def live_jobs(client: redis.Redis, jobs: JobStore) -> dict[str, Job]:
    """Jobs not yet ended: each is in its tenant's active set until its terminal transition."""
    live: dict[str, Job] = {}
    for key in client.scan_iter(match=ACTIVE_PREFIX + "*", count=500):
        for job_id in cast("set[str]", client.smembers(key)):  # the client decodes replies
            job = jobs.get(job_id)
            if job is not None and not job.status.terminal:
                live[job.id] = job
    return live


def keys_of(job: Job) -> set[str]:
    """The storage keys a job reads: its uploads, then the frames and images its ingest chose."""
    keys: set[str] = set()
    for kind in ("videos", "images"):
        for source in job.request.get(kind) or []:
            if source.get("kind") == "upload":
                keys.add(source["location"])
    for item in job.media or []:
        keys.update(frame["key"] for frame in item.get("frames", []))
        if "key" in item:
            keys.add(item["key"])
    return keys


def kept_videos(client: redis.Redis, live: dict[str, Job]) -> set[str]:
    """Ids of the stored videos whose objects stay: those with a record, and those a live job names."""
    ids = {key.removeprefix(VIDEO_KEY_PREFIX) for key in client.scan_iter(match=VIDEO_KEY_PREFIX + "*", count=500)}
    for job in live.values():
        ids.update(source["location"] for source in job.request.get("videos") or [] if source.get("kind") == "video")
    return ids


def expired(
    objects: Iterable[StoredObject],
    *,
    live: dict[str, Job],
    retention_s: float,
    now: float,
    videos: set[str] | frozenset[str] = frozenset(),
) -> Iterator[str]:
    """The keys of ``objects`` that the rules above delete; ``videos`` are ``kept_videos``."""
    kept: set[str] = set().union(*(keys_of(job) for job in live.values()))
    for stored in objects:
        age = now - stored.modified
        if stored.key in kept:
            continue
        if stored.key.startswith((UPLOADS_PREFIX, VIDEOS_PREFIX)):
            # uploads/<job or video id>/..., videos/<video id>/...
            owner = stored.key.split("/", 2)[1]
            if owner not in live and owner not in videos and age > UPLOAD_GRACE_S:
                yield stored.key
        elif age > retention_s:
            yield stored.key


def trim_indexes(client: redis.Redis, *, ttl_s: float, now: float) -> int:
    """Remove index entries whose record expired; the number removed."""
    removed = 0
    indexes = [INDEX_KEY, *client.scan_iter(match=TENANT_INDEX_PREFIX + "*", count=500, _type="zset")]
    for index in indexes:
        # Records expire job_ttl_s after their creation, which is the entry's score.
        removed += int(client.zremrangebyscore(index, "-inf", now - ttl_s))
        # A record can also be gone sooner (a lowered TTL, an operator): the oldest go first.
        while oldest := cast("list[str]", client.zrange(index, 0, _PAGE - 1)):  # the client decodes replies
            with client.pipeline(transaction=False) as pipe:
                for job_id in oldest:
                    pipe.exists(KEY_PREFIX + job_id)
                present = pipe.execute()
            gone = [job_id for job_id, there in zip(oldest, present, strict=True) if not there]
            if gone:
                removed += int(client.zrem(index, *gone))
            if len(gone) < len(oldest):
                break
    return removed


def sweep(
    client: redis.Redis,
    jobs: JobStore,
    store: ObjectStore,
    *,
    retention_s: float,
    job_ttl_s: float,
    lock_s: float = 3600,
    now: float | None = None,
) -> SweepOutcome | None:
    """One pass over storage and the indexes; None when another worker holds the lock."""
    if not client.set(LOCK_KEY, "1", nx=True, ex=max(60, int(lock_s))):
        return None
    try:
        # Taken before the live jobs are read: a job that names its objects after this moment
        # picked them younger than the retention (worker.cpu.frame_store), so they are not deleted.
        now = time.time() if now is None else now
        live = live_jobs(client, jobs)
        videos = kept_videos(client, live)
        rule = store.set_expiration(math.ceil((retention_s + job_ttl_s) / _DAY_S))
        deleted = 0

        def counted(keys: Iterable[str]) -> Iterator[str]:
            nonlocal deleted
            for key in keys:
                deleted += 1
                yield key

        store.delete(counted(expired(store.list_objects(), live=live, retention_s=retention_s, now=now, videos=videos)))
        removed = trim_indexes(client, ttl_s=job_ttl_s, now=now)
        return SweepOutcome(deleted=deleted, live_jobs=len(live), index_entries_removed=removed, expiration_rule=rule)
    finally:
        client.delete(LOCK_KEY)
