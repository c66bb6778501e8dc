"""The states of a job, in one place for the job store and for the Python client (which must
import without Redis)."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    INGESTING = "ingesting"
    QUEUED_GPU = "queued_gpu"
    GENERATING = "generating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


# A StrEnum member equals (and hashes as) its value, so plain status strings test against these too.
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE = frozenset(JobStatus) - TERMINAL
