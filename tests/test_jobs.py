"""Job records against the real Redis."""

from __future__ import annotations

from common.connections import redis_client
from common.jobs import JobStatus, JobStore
from common.settings import Settings


def _store(settings: Settings) -> JobStore:
    return JobStore(redis_client(settings), ttl_s=settings.job_ttl_s)


def test_a_job_moves_through_its_stages_and_ends_once(local_settings: Settings) -> None:
    jobs = _store(local_settings)
    job = jobs.create({"question": "q"})
    assert job.status is JobStatus.QUEUED
    assert jobs.transition(job.id, JobStatus.INGESTING, allowed_from={JobStatus.QUEUED})
    assert jobs.transition(job.id, JobStatus.QUEUED_GPU, allowed_from={JobStatus.INGESTING})
    assert jobs.transition(job.id, JobStatus.GENERATING, allowed_from={JobStatus.QUEUED_GPU})
    assert jobs.succeed(job.id, {"answer": "first"})
    # A redelivered task can neither write a second answer nor fail or cancel the job.
    assert not jobs.succeed(job.id, {"answer": "second"})
    assert not jobs.fail(job.id, "internal", "late failure")
    assert not jobs.cancel(job.id)
    stored = jobs.get(job.id)
    assert stored is not None
    assert stored.status is JobStatus.SUCCEEDED
    assert stored.result == {"answer": "first"}
    assert stored.error is None


def test_a_job_cannot_move_backwards(local_settings: Settings) -> None:
    jobs = _store(local_settings)
    job = jobs.create({})
    jobs.transition(job.id, JobStatus.QUEUED_GPU, allowed_from={JobStatus.QUEUED})
    assert not jobs.transition(job.id, JobStatus.INGESTING, allowed_from={JobStatus.QUEUED, JobStatus.INGESTING})
    assert jobs.get(job.id).status is JobStatus.QUEUED_GPU


def test_cancel_wins_over_a_late_stage_change(local_settings: Settings) -> None:
    jobs = _store(local_settings)
    job = jobs.create({})
    assert jobs.cancel(job.id)
    assert not jobs.transition(job.id, JobStatus.INGESTING, allowed_from={JobStatus.QUEUED})
    stored = jobs.get(job.id)
    assert stored is not None and stored.status is JobStatus.CANCELLED
    assert stored.error == {"code": "cancelled", "message": "cancelled by the client"}


def test_unknown_ids_are_absent_not_pending(local_settings: Settings) -> None:
    jobs = _store(local_settings)
    assert jobs.get("no-such-job") is None
    assert not jobs.transition("no-such-job", JobStatus.FAILED)


def test_records_expire_after_retention(local_settings: Settings) -> None:
    jobs = _store(local_settings)
    job = jobs.create({})
    ttl = redis_client(local_settings).ttl(JobStore.key(job.id))
    assert 0 < ttl <= local_settings.job_ttl_s


def test_listing_is_newest_first_and_paginated(local_settings: Settings) -> None:
    jobs = _store(local_settings)
    created = [jobs.create({"n": n}).id for n in range(5)]
    first = jobs.list(limit=2)
    assert [job.id for job in first] == created[::-1][:2]
    second = jobs.list(limit=2, before=first[-1].created_at)
    assert [job.id for job in second] == created[::-1][2:4]


def test_stage_times_and_durations(local_settings: Settings) -> None:
    jobs = _store(local_settings)
    job = jobs.create({})
    jobs.mark(job.id, "ingest", "start", at=100.0)
    jobs.mark(job.id, "ingest", "end", at=101.5)
    stored = jobs.get(job.id)
    assert stored is not None
    assert stored.stage_seconds() == {"ingest": 1.5}
    assert stored.to_public()["stages"]["ingest"] == {"start": 100.0, "end": 101.5, "seconds": 1.5}
