"""Every error leaves the API as ``{"error": {"code", "message"}}``; never as a stack trace."""

from __future__ import annotations

import logging

import redis
from flask import Flask, Response, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from common.errors import InvalidRequest, VideoQAError

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, details: object = None) -> tuple[Response, int]:
    body: dict[str, object] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return jsonify({"error": body}), status


def validation_problems(exc: ValidationError, *, flat: bool = False) -> list[dict[str, str]]:
    """``{field, message}`` per error, in plain words (``api.problems``)."""
    from api.problems import validation_problems as plain_problems

    return plain_problems(exc, flat=flat)


def invalid(problems: list[dict[str, str]]) -> InvalidRequest:
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return InvalidRequest(f"invalid request: {summary}", details=problems)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(VideoQAError)
    def _service_error(exc: VideoQAError) -> tuple[Response, int]:
        return error_response(exc.http_status, exc.code, exc.message, exc.details)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(redis.RedisError)
    def _store_unavailable(exc: redis.RedisError) -> tuple[Response, int]:
        # Full (maxmemory with noeviction), restarting or unreachable: the client should retry.
        log.warning("job store error: %s", exc.__class__.__name__)
        if isinstance(exc, redis.exceptions.OutOfMemoryError):
            message = "the job store is full; no job was created; try again later"
        else:
            message = "the job store is unavailable; no job was created; try again later"
        response, status = error_response(503, "service_unavailable", message)
        response.headers["Retry-After"] = "5"
        return response, status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return error_response(500, "internal", "internal error; the request was not completed")
