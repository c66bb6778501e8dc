"""Deliveries counted in the job record: a job that keeps ending its worker fails as poison."""

from __future__ import annotations

from common.connections import redis_client
from common.jobs import JobStatus, JobStore
from common.settings import Settings


def test_third_lost_delivery_makes_a_job_poison(local_settings: Settings) -> None:
    jobs = JobStore(redis_client(local_settings), ttl_s=600)
    job = jobs.create({})
    assert jobs.begin_attempt(job.id, 3)  # first delivery: its worker dies
    assert jobs.begin_attempt(job.id, 3)  # second: dies too
    assert jobs.begin_attempt(job.id, 3)  # third: dies too
    assert not jobs.begin_attempt(job.id, 3)
    stored = jobs.get(job.id)
    assert stored is not None and stored.status is JobStatus.FAILED
    assert stored.error == {"code": "poison", "message": "the job ended its worker 3 times; not tried again"}


def test_retries_after_transient_errors_are_not_lost_deliveries(local_settings: Settings) -> None:
    jobs = JobStore(redis_client(local_settings), ttl_s=600)
    job = jobs.create({})
    for _ in range(6):
        assert jobs.begin_attempt(job.id, 3)
        jobs.note_retry(job.id)
    assert jobs.get(job.id).status is JobStatus.QUEUED
