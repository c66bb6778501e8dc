"""Finds stored videos whose queue message is gone and sends them again, as ``worker.app.reconciler``
does for jobs: a video still ``processing``, unchanged for ``stale_after_s`` and with no message
queued or unacknowledged, is sent to the CPU queue again."""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from common.celery_config import CPU_QUEUE, VIDEO_TASK
from common.videos import VideoStore
from worker.app.reconciler import job_ids_in_flight, scan_lock

log = logging.getLogger(__name__)

LOCK_KEY = "videoqa:reconciler:videos:lock"


def reconcile_videos(
    client: redis.Redis,
    videos: VideoStore,
    send_task: Callable[[str, str], None],
    *,
    stale_after_s: float,
    now: float | None = None,
) -> list[str]:
    """One scan; returns the ids sent again."""
    with scan_lock(client, LOCK_KEY, stale_after_s) as held:
        if not held:
            return []
        in_flight = job_ids_in_flight(client, (CPU_QUEUE,))
        resent = []
        for video in videos.stale_processing(older_than_s=stale_after_s, now=now):
            if video.id in in_flight:
                continue
            if videos.touch(video.id):
                send_task(VIDEO_TASK, video.id)
                resent.append(video.id)
                log.warning("video %s was processing with no message for it; sent again", video.id)
        return resent
