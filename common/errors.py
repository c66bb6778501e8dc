"""The service's exceptions: each carries a stable error code and the HTTP status it maps to."""

from __future__ import annotations

from typing import Any


class VideoQAError(Exception):
    """Base of every error the service reports to a user.

    ``code`` is stable and documented; ``message`` is for people. Permanent errors fail a job at
    once; ``TransientError`` subclasses are retried with backoff.
    """

    code = "internal"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body


class InvalidRequest(VideoQAError):
    code = "invalid_request"
    http_status = 400


class Unauthorized(VideoQAError):
    code = "unauthorized"
    http_status = 401


class TooManyRequests(VideoQAError):
    code = "rate_limited"
    http_status = 429


class TooManyActiveJobs(TooManyRequests):
    code = "too_many_active_jobs"

    def __init__(self, cap: int) -> None:
        super().__init__(f"{cap} jobs are already queued or running for this key; wait for some to finish")


class NotFound(VideoQAError):
    code = "not_found"
    http_status = 404


class Conflict(VideoQAError):
    code = "conflict"
    http_status = 409


class PayloadTooLarge(VideoQAError):
    code = "payload_too_large"
    http_status = 413


class InvalidMedia(VideoQAError):
    """The bytes are not a video (or image) this service can decode."""

    code = "invalid_media"
    http_status = 422


class MediaTooLarge(VideoQAError):
    code = "media_too_large"
    http_status = 422


class FetchFailed(VideoQAError):
    """The media could not be fetched from where the request said it lives."""

    code = "fetch_failed"
    http_status = 422


class ResourceExhausted(VideoQAError):
    """The job alone does not fit in the GPU's memory (its prompt is too long for this GPU)."""

    code = "resource_exhausted"
    http_status = 422


class TransientError(VideoQAError):
    """Worth retrying: the cause is outside the request (network, storage, broker)."""

    code = "unavailable"
    http_status = 503


class StorageUnavailable(TransientError):
    code = "storage_unavailable"


class ServiceUnavailable(TransientError):
    code = "service_unavailable"
