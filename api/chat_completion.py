"""A job's outcome in OpenAI's shapes: a ``chat.completion``, or ``chat.completion.chunk`` events
read from the job's event stream (common.events) as Server-Sent Events.

The completion's id is ``chatcmpl-<job id>``: the job behind it is ``GET /v1/jobs/<job id>``.
A streaming client that goes away cancels its job: the server notices when a write fails (a
comment line is written every second while the job has nothing new) and closes the generator.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Iterator
from typing import Any

import redis

from common.errors import Conflict, VideoQAError
from common.events import DONE, START, TOKEN, JobEvents
from common.jobs import Job, JobStatus, JobStore, decode_job

log = logging.getLogger(__name__)
# Idle time between writes of a stream; a failed write is how a closed connection shows.
IDLE_WRITE_S = 1.0


def completion_id(job: Job) -> str:
    return f"chatcmpl-{job.id}"


def status_of(code: str) -> int:
    """The HTTP status a failed job's error code stands for (common.errors), 500 if unknown."""
    pending: list[type[VideoQAError]] = [VideoQAError]
    while pending:
        kind = pending.pop()
        if kind.code == code:
            return kind.http_status
        pending += kind.__subclasses__()
    return 500


class JobFailed(VideoQAError):
    """The job behind a completion failed; its own error code and the status that code has."""

    def __init__(self, job: Job) -> None:
        error = job.error or {}
        super().__init__(str(error.get("message") or "the job failed"), code=str(error.get("code") or "internal"))
        self.http_status = status_of(self.code)


class StillRunning(VideoQAError):
    code = "timeout"
    http_status = 504


def outcome(job: Job) -> dict[str, Any]:
    """The result of a job that succeeded; ``VideoQAError`` for one that failed or was cancelled."""
    if job.status == JobStatus.SUCCEEDED and job.result is not None:
        return job.result
    if job.status == JobStatus.CANCELLED:
        raise Conflict(f"job {job.id} was cancelled", code="cancelled")
    if job.status == JobStatus.FAILED:
        raise JobFailed(job)
    raise StillRunning(f"job {job.id} has not ended yet ({job.status}); it goes on: GET /v1/jobs/{job.id}")


def finish_reason(job: Job, result: dict[str, Any]) -> str:
    """``stop`` when the model ended its answer, ``length`` when max_new_tokens did."""
    if result.get("finish_reason") in ("stop", "length"):
        return str(result["finish_reason"])
    limit = int(job.request.get("generation", {}).get("max_new_tokens", 0))
    return "length" if result["usage"]["completion_tokens"] >= limit else "stop"


def usage(result: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = int(result["usage"]["prompt_tokens"]), int(result["usage"]["completion_tokens"])
    counted: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if "cached_tokens" in result["usage"]:  # OpenAI's place for prompt tokens served from a cache
        counted["prompt_tokens_details"] = {"cached_tokens": int(result["usage"]["cached_tokens"])}
    return counted


def completion_body(job: Job, model: str) -> dict[str, Any]:
    result = outcome(job)
    return {
        "id": completion_id(job),
        "object": "chat.completion",
        "created": int(job.created_at),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["answer"], "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(job, result),
            }
        ],
        "usage": usage(result),
    }


def openai_error(message: str, code: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


class _Chunks:
    def __init__(self, job: Job, model: str, include_usage: bool) -> None:
        self.base = {
            "id": completion_id(job),
            "object": "chat.completion.chunk",
            "created": int(job.created_at),
            "model": model,
        }
        self.include_usage = include_usage

    def choice(self, delta: dict[str, Any], finish: str | None = None) -> str:
        body = {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            body["usage"] = None
        return _data(body)

    def usage(self, result: dict[str, Any]) -> str:
        return _data({**self.base, "choices": [], "usage": usage(result)})


def completion_chunks(
    jobs: JobStore, events: JobEvents, job: Job, model: str, include_usage: bool
) -> Generator[str, None, None]:
    """The job's answer as chunks as it is generated, then its end; the job is cancelled when the
    client leaves before that end (a failed write closes this generator: ``GeneratorExit``)."""
    chunks = _Chunks(job, model, include_usage)
    try:
        yield chunks.choice({"role": "assistant", "content": ""})
        yield from _until_done(jobs, events, job, chunks)
    except GeneratorExit:
        # The client went away (or this server is stopping): nobody will read this answer.
        log.info("chat completion stream of job %s closed before its end; cancelling the job", job.id)
        try:
            jobs.cancel(job.id)
        except redis.RedisError:
            log.warning("could not cancel job %s after its stream closed", job.id)
        raise
    except redis.RedisError as exc:
        # Redis out of reach mid-stream: say so; the job itself goes on and its record will tell.
        log.warning("chat completion stream of job %s lost Redis: %s", job.id, exc.__class__.__name__)
        message = f"the job's events are unavailable; GET /v1/jobs/{job.id} for its outcome"
        yield _data(openai_error(message, "service_unavailable", 503))
        yield "data: [DONE]\n\n"


def _until_done(jobs: JobStore, events: JobEvents, job: Job, chunks: _Chunks) -> Iterator[str]:
    streamed: list[str] = []
    after = START
    while True:
        batch = events.read(job.id, after, block_ms=int(IDLE_WRITE_S * 1000))
        if not batch:
            yield ": keep-alive\n\n"
            if jobs.get(job.id) is None:  # past retention, or deleted
                yield _data(openai_error(f"job {job.id} is gone", "not_found", 404))
                yield "data: [DONE]\n\n"
                return
            continue
        for event in batch:
            after = event.id
            if event.kind == TOKEN:
                streamed.append(event.data["text"])
                yield chunks.choice({"content": event.data["text"]})
            elif event.kind == DONE:
                yield from _ending(decode_job(event.data), "".join(streamed), chunks)
                return


def _ending(job: Job, streamed: str, chunks: _Chunks) -> Iterator[str]:
    try:
        result = outcome(job)
    except VideoQAError as exc:
        yield _data(openai_error(exc.message, exc.code, exc.http_status))
        yield "data: [DONE]\n\n"
        return
    answer = str(result["answer"])
    if answer != streamed and answer.startswith(streamed):
        # Token events are sent at most every 50 ms; the record holds the whole answer.
        yield chunks.choice({"content": answer[len(streamed) :]})
    yield chunks.choice({}, finish_reason(job, result))
    if chunks.include_usage:
        yield chunks.usage(result)
    yield "data: [DONE]\n\n"
