"""Finds jobs whose queue message is gone and sends them again.

A Redis restart without persistence, a flushed queue or a message dropped by an operator would
otherwise leave a job in a non-terminal state for ever. A job is sent again when it has not moved
for ``stale_after_s`` and no message for it waits in a queue or sits unacknowledged with a
worker. Every CPU worker runs the scan on a timer; a short Redis lock lets one run at a time.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from common.celery_config import CPU_QUEUE, GENERATE_TASK, GPU_QUEUE, INGEST_TASK
from common.jobs import ACTIVE_PREFIX, JobStatus, JobStore

log = logging.getLogger(__name__)

LOCK_KEY = "videoqa:reconciler:lock"
# kombu's Redis transport keeps delivered, unacknowledged messages in this hash.
UNACKED_KEY = "unacked"
TASK_FOR_STATUS = {
    JobStatus.QUEUED: INGEST_TASK,
    JobStatus.INGESTING: INGEST_TASK,
    JobStatus.QUEUED_GPU: GENERATE_TASK,
    JobStatus.GENERATING: GENERATE_TASK,
}


def _job_id_of(message: dict[str, Any]) -> str | None:
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def job_ids_in_flight(client: redis.Redis, queues: Iterable[str] = (CPU_QUEUE, GPU_QUEUE)) -> set[str]:
    """Job ids that still have a message: queued, or delivered and not yet acknowledged."""
    found: set[str] = set()
    for queue in queues:
        for raw in client.lrange(queue, 0, -1):
            found.add(_job_id_of(json.loads(raw)) or "")
    for raw in client.hvals(UNACKED_KEY):
        found.add(_job_id_of(json.loads(raw)[0]) or "")
    found.discard("")
    return found


def reconcile(
    client: redis.Redis,
    jobs: JobStore,
    send_task: Callable[[str, str], None],
    *,
    stale_after_s: float,
    now: float | None = None,
) -> list[str]:
    """One scan; returns the ids sent again."""
    now = time.time() if now is None else now
    with scan_lock(client, LOCK_KEY, stale_after_s) as held:
        if not held:
            return []
        in_flight = job_ids_in_flight(client)
        resent = []
        for key in client.scan_iter(match=ACTIVE_PREFIX + "*", count=500):
            for job_id in client.smembers(key):
                job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
                job = jobs.get(job_id)
                if job is None or job.status.terminal:
                    client.srem(key, job_id)
                    continue
                if now - job.updated_at < stale_after_s or job_id in in_flight:
                    continue
                # The guarded write also refreshes updated_at, so the next scan waits again.
                if jobs.transition(job_id, None, allowed_from={job.status}, resent_at=repr(now)):
                    send_task(TASK_FOR_STATUS[job.status], job_id)
                    resent.append(job_id)
                    log.warning("job %s was %s with no message for it; sent again", job_id, job.status)
        return resent


@contextmanager
def scan_lock(client: redis.Redis, key: str, stale_after_s: float) -> Iterator[bool]:
    """Whether this process holds ``key`` for one scan: one scan at a time across the workers,
    the lock expiring on its own if its holder dies mid-scan."""
    if not client.set(key, "1", nx=True, ex=max(5, int(stale_after_s))):
        yield False
        return
    try:
        yield True
    finally:
        client.delete(key)
