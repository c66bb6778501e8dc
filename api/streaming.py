"""``GET /v1/jobs/{id}/events``: a job's events as Server-Sent Events, read from its Redis stream.

Without ``Last-Event-ID`` the stream starts at the job's first event; with it, just after that
event. Between events a comment line every ``events_heartbeat_s`` keeps proxies from closing the
connection. The response ends after ``done``, or when the record is gone (past retention).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from common.errors import InvalidRequest
from common.events import DONE, START, STATUS, Event, JobEvents
from common.jobs import Job, JobStore, decode_job

# A stream id as Redis writes it: milliseconds, then a sequence number.
_EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")
BLOCK_S = 5.0  # below the Redis client's socket timeout

Render = Callable[[Job], dict[str, Any]]


def resume_after(last_event_id: str | None) -> str:
    if last_event_id is None or last_event_id == "":
        return START
    if not _EVENT_ID.fullmatch(last_event_id):
        raise InvalidRequest(f"Last-Event-ID {last_event_id!r} is not an event id of this stream")
    return last_event_id


def _message(event_id: str, kind: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _render_event(event: Event, render: Render) -> str:
    data = event.data if event.kind not in (STATUS, DONE) else render(decode_job(event.data))
    return _message(event.id, event.kind, data)


def event_stream(
    jobs: JobStore, events: JobEvents, job: Job, after: str, render: Render, heartbeat_s: float
) -> Iterator[str]:
    batch = events.read(job.id, after)
    if after == START and not batch:
        # A job older than its stream (or one whose stream was trimmed away): its state now.
        yield _message(START, STATUS, render(job))
        if job.status.terminal:
            yield _message(START, DONE, render(job))
            return
    if not batch:
        yield ": keep-alive\n\n"  # the headers now, not at the first event
    last_write = time.monotonic()
    while True:
        for event in batch:
            yield _render_event(event, render)
            after = event.id
            if event.kind == DONE:
                return
        if batch:
            last_write = time.monotonic()
        batch = events.read(job.id, after, block_ms=int(min(heartbeat_s, BLOCK_S) * 1000))
        if batch:
            continue
        if time.monotonic() - last_write >= heartbeat_s:
            yield ": keep-alive\n\n"
            last_write = time.monotonic()
        current = jobs.get(job.id)
        if current is None:
            return
        if current.status.terminal:
            # Ended between the read and now (its done is then in the stream), or before ``after``.
            batch = events.read(job.id, after)
            if not batch:
                return
