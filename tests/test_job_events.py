"""Job events in Redis: appended by the transitions themselves, against the real Redis."""

from __future__ import annotations

from common.connections import redis_client
from common.events import JobEvents, events_key
from common.jobs import KEY_PREFIX, JobStatus, JobStore
from common.settings import Settings


def _stores(settings: Settings) -> tuple[JobStore, JobEvents]:
    client = redis_client(settings)
    return JobStore(client, ttl_s=settings.job_ttl_s), JobEvents(client)


def test_each_change_of_status_is_one_event_and_the_end_is_done(local_settings: Settings) -> None:
    jobs, events = _stores(local_settings)
    job = jobs.create({"question": "q"})
    jobs.transition(job.id, JobStatus.INGESTING)
    jobs.transition(job.id, JobStatus.QUEUED_GPU)
    jobs.transition(job.id, JobStatus.GENERATING)
    # A redelivered generate task: the same status again, and fields alone, are no events.
    jobs.transition(job.id, JobStatus.GENERATING, allowed_from={JobStatus.GENERATING})
    jobs.transition(job.id, None, attempts="2")
    events.publish_tokens({job.id: "Hel"})
    events.publish_tokens({job.id: "lo"})
    jobs.succeed(job.id, {"answer": "Hello"})
    # Late ones: a second answer, a token after the end.
    jobs.fail(job.id, "internal", "late")
    events.publish_tokens({job.id: "!"})
    seen = events.read(job.id)
    assert [(e.kind, e.data.get("status", e.data.get("text"))) for e in seen] == [
        ("status", "queued"),
        ("status", "ingesting"),
        ("status", "queued_gpu"),
        ("status", "generating"),
        ("token", "Hel"),
        ("token", "lo"),
        ("status", "succeeded"),
        ("done", "succeeded"),
    ]
    assert '"answer": "Hello"' in seen[-1].data["result"]  # the record's stored fields
    assert events.last_id(job.id) == seen[-1].id
    assert events.read(job.id, seen[3].id) == seen[4:]


def test_a_cancelled_job_gets_no_tokens_after_its_end(local_settings: Settings) -> None:
    jobs, events = _stores(local_settings)
    job = jobs.create({})
    for status in (JobStatus.INGESTING, JobStatus.QUEUED_GPU, JobStatus.GENERATING):
        jobs.transition(job.id, status)
    assert jobs.cancel(job.id)
    events.publish_tokens({job.id: "too late"})
    assert [e.kind for e in events.read(job.id)][-2:] == ["status", "done"]
    assert "token" not in [e.kind for e in events.read(job.id)]


def test_the_stream_lives_as_long_as_the_record(local_settings: Settings) -> None:
    jobs, events = _stores(local_settings)
    client = jobs.client
    job = jobs.create({})
    client.expire(KEY_PREFIX + job.id, 50)
    jobs.transition(job.id, JobStatus.INGESTING)
    assert 0 < client.ttl(events_key(job.id)) <= 50
    client.delete(KEY_PREFIX + job.id, events_key(job.id))
    # Tokens for a job whose record and stream expired bring neither back.
    events.publish_tokens({job.id: "x"})
    assert not client.exists(events_key(job.id))
