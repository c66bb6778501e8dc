"""Answering when a job ends: ``?wait=N`` on a job and ``Prefer: wait=N`` on a submission.

The request blocks on the job's event stream (XREAD BLOCK), never polls, and holds no state the
next request would need; a gunicorn thread per waiting client (``worker.cli.stack.api_command``).
"""

from __future__ import annotations

import math
import time

from common.errors import InvalidRequest
from common.events import DONE, JobEvents
from common.jobs import Job, JobStore

MAX_WAIT_S = 60
# Below the Redis client's socket timeout: a longer wait is several blocking reads.
BLOCK_S = 5.0


def wait_seconds(value: str, name: str) -> float:
    """``value`` as a wait in seconds (0 < N <= 60); ``InvalidRequest`` naming ``name`` otherwise."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_WAIT_S):
        raise InvalidRequest(f"{name} must be a number of seconds above 0 and at most {MAX_WAIT_S}, not {value!r}")
    return seconds


def preferred_wait(prefer_headers: list[str]) -> str | None:
    """The value of the ``wait`` preference among ``Prefer`` headers (RFC 7240), as sent."""
    for header in prefer_headers:
        for preference in header.split(","):
            name, _, value = preference.split(";", 1)[0].partition("=")
            if name.strip().lower() == "wait":
                return value.strip().strip('"')
    return None


def wait_for_end(jobs: JobStore, events: JobEvents, job_id: str, timeout_s: float) -> Job | None:
    """The job once it has ended, or as it is after ``timeout_s``; None if it is gone."""
    # The stream's position before the record is read: an end after this read is an event after it.
    after = events.last_id(job_id)
    job = jobs.get(job_id)
    deadline = time.monotonic() + timeout_s
    while job is not None and not job.status.terminal:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        batch = events.read(job_id, after, block_ms=max(1, int(min(remaining, BLOCK_S) * 1000)))
        if batch:
            after = batch[-1].id
            if not any(event.kind == DONE for event in batch):
                continue
        job = jobs.get(job_id)
    return job
