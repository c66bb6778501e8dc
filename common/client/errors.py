"""The client's errors: all are ``VideoQAError`` (the service's own base), with the API's code."""

from __future__ import annotations

from typing import Any

from common.client.models import Job
from common.errors import VideoQAError

__all__ = ["APIError", "EventsUnavailable", "JobFailed", "Unreachable", "VideoQAError", "WaitTimedOut"]


class APIError(VideoQAError):
    """The API answered with an error: ``code`` and ``message`` are its own, ``http_status`` the
    answer's status, ``details`` its per-field problems when it sent some."""

    def __init__(self, message: str, *, code: str, http_status: int, details: Any = None) -> None:
        super().__init__(message, code=code, details=details)
        self.http_status = http_status

    def __str__(self) -> str:
        return f"{self.code} ({self.http_status}): {self.message}"


class EventsUnavailable(APIError):
    """The server has no event stream for jobs (a version before it): wait or poll instead."""


class Unreachable(VideoQAError):
    """No HTTP answer came (refused, reset, timed out); ``http_status`` is 0."""

    code = "unreachable"
    http_status = 0


class JobFailed(VideoQAError):
    """The job ended ``failed`` (its error's code and message) or ``cancelled`` (code
    ``cancelled``); ``job`` is its final record. ``http_status`` is the record's answer, 200."""

    http_status = 200

    def __init__(self, job: Job) -> None:
        error = job.error or {}
        if job.status == "cancelled":
            code, message = "cancelled", error.get("message") or "the job was cancelled"
        else:
            code, message = error.get("code", "failed"), error.get("message", "the job failed")
        super().__init__(message, code=code)
        self.job = job

    def __str__(self) -> str:
        return f"job {self.job.id} {self.job.status}: {self.code}: {self.message}"


class WaitTimedOut(VideoQAError, TimeoutError):
    """The job had not ended when the wait's time was up; ``job`` is its latest record."""

    code = "wait_timeout"
    http_status = 0

    def __init__(self, job: Job, timeout_s: float) -> None:
        super().__init__(f"job {job.id} still {job.status} after {timeout_s:g} s")
        self.job = job
