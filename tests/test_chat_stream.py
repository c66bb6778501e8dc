"""A job's outcome as chat completion chunks (api.chat_completion), on real Redis (the spare
database) with the job store and event stream the workers write, but no workers: the test moves
the job through its states and publishes its token events itself."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from api.chat_completion import completion_body, completion_chunks, status_of
from common.errors import VideoQAError
from common.events import JobEvents
from common.jobs import Job, JobStatus, JobStore

RESULT = {"answer": "A cat jumps.", "usage": {"prompt_tokens": 30, "completion_tokens": 4}, "finish_reason": "stop"}


@pytest.fixture()
def store(spare_redis_url: str) -> Iterator[tuple[JobStore, JobEvents]]:
    client = redis.Redis.from_url(spare_redis_url, decode_responses=True)
    yield JobStore(client, ttl_s=600), JobEvents(client)


def _generating(jobs: JobStore) -> Job:
    job = jobs.create({"question": "What?", "generation": {"max_new_tokens": 4}})
    for status in (JobStatus.INGESTING, JobStatus.QUEUED_GPU, JobStatus.GENERATING):
        assert jobs.transition(job.id, status)
    return job


def _parsed(event: str) -> Any:
    assert event.startswith("data: ") and event.endswith("\n\n"), event
    body = event.removeprefix("data: ").strip()
    return body if body == "[DONE]" else json.loads(body)


def test_tokens_become_chunks_then_the_reason_usage_and_done(store: tuple[JobStore, JobEvents]) -> None:
    jobs, events = store
    job = _generating(jobs)
    events.publish_tokens({job.id: "A cat"})
    # The last text is in the record only (token events are sent at most every 50 ms).
    assert jobs.succeed(job.id, RESULT)
    sent = [
        _parsed(e) for e in completion_chunks(jobs, events, job, "tiny", include_usage=True) if not e.startswith(":")
    ]
    assert [c["choices"][0]["delta"] if isinstance(c, dict) and c["choices"] else c for c in sent] == [
        {"role": "assistant", "content": ""},
        {"content": "A cat"},
        {"content": " jumps."},
        {},
        sent[-2],
        "[DONE]",
    ]
    assert sent[3]["choices"][0]["finish_reason"] == "stop"
    assert sent[-2]["usage"] == {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34}
    assert {c["id"] for c in sent[:-1]} == {f"chatcmpl-{job.id}"}
    assert jobs.get(job.id).status == JobStatus.SUCCEEDED


def test_a_stream_closed_before_the_end_cancels_the_job(store: tuple[JobStore, JobEvents]) -> None:
    jobs, events = store
    job = _generating(jobs)
    events.publish_tokens({job.id: "A"})
    stream = completion_chunks(jobs, events, job, "tiny", include_usage=False)
    assert "assistant" in next(stream)
    assert '"A"' in next(stream)
    stream.close()  # what the server does when a write to the client fails
    assert jobs.get(job.id).status == JobStatus.CANCELLED


def test_a_failed_job_ends_the_stream_with_its_error(store: tuple[JobStore, JobEvents]) -> None:
    jobs, events = store
    job = _generating(jobs)
    assert jobs.fail(job.id, "invalid_media", "not a video")
    sent = [
        _parsed(e) for e in completion_chunks(jobs, events, job, "tiny", include_usage=False) if not e.startswith(":")
    ]
    assert sent[-2] == {
        "error": {"message": "not a video", "type": "invalid_request_error", "param": None, "code": "invalid_media"}
    }
    assert sent[-1] == "[DONE]"
    assert status_of("invalid_media") == 422 and status_of("no_such_code") == 500


def test_a_completion_body_or_the_jobs_error(store: tuple[JobStore, JobEvents]) -> None:
    jobs, _ = store
    job = _generating(jobs)
    assert jobs.succeed(
        job.id, {**RESULT, "finish_reason": None, "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    )
    body = completion_body(jobs.get(job.id), "tiny")
    # Without a finish_reason in the record (written before it existed): max_new_tokens reached.
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 7
    cancelled = _generating(jobs)
    assert jobs.cancel(cancelled.id)
    with pytest.raises(VideoQAError) as refused:
        completion_body(jobs.get(cancelled.id), "tiny")
    assert (refused.value.http_status, refused.value.code) == (409, "cancelled")
