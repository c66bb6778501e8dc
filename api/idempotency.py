"""``Idempotency-Key`` on submission: the same key (per tenant, for ``idempotency_ttl_s``) names
one job, so a client retrying a submission it never heard back from gets that job, not a second.

The key is claimed with ``SET NX`` before any upload is stored, holding a fingerprint of the
request (its validated body and the bytes of each uploaded file) and the new job's id. A request
finding the key held by the same fingerprint answers with that job; one with another fingerprint
is refused (``idempotency_conflict``). A request that fails before its job exists releases the
key, so the client's retry is served afresh.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from pydantic import BaseModel
from werkzeug.datastructures import FileStorage

from common.errors import Conflict, InvalidRequest, VideoQAError
from common.jobs import Job

KEY_PREFIX = "videoqa:idempotency:"
MAX_KEY_CHARS = 255
# How long a request waits for a concurrent one with the same key to create its job; a claim
# older than this whose job does not exist belongs to a request that died (or a job expired).
SETTLE_S = 10.0
_CHUNK = 1 << 20

# Deletes the claim only if it is still the one this request made.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class IdempotencyConflict(VideoQAError):
    code = "idempotency_conflict"
    http_status = 422


def check_key(key: str) -> str:
    if not 1 <= len(key) <= MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable ASCII characters")
    return key


class Records(Protocol):
    """Where the claimed ids live: job records, or stored videos (``api.video_submission``)."""

    def get(self, record_id: str) -> Any: ...


def fingerprint(request: BaseModel, uploads: dict[str, list[FileStorage]]) -> str:
    """A digest of what the request asks: its validated body and its files' names and bytes."""
    digest = hashlib.sha256(json.dumps(request.model_dump(mode="json"), sort_keys=True).encode())
    for field in sorted(uploads):
        for upload in uploads[field]:
            digest.update(f"\0{field}\0{upload.filename or ''}\0".encode())
            content = hashlib.sha256()
            while chunk := upload.stream.read(_CHUNK):
                content.update(chunk)
            upload.stream.seek(0)  # stored later from the start
            digest.update(content.digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class Claim:
    """The key is this request's: it goes on to create ``job_id``."""

    redis_key: str
    value: str


class IdempotencyKeys:
    def __init__(self, client: redis.Redis, *, ttl_s: int) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._release = client.register_script(_RELEASE)

    def claim(
        self, tenant: str, key: str, digest: str, job_id: str, jobs: Records, *, scope: str = ""
    ) -> Claim | Job | Any:
        """Claim ``key`` for ``job_id``; or the job it already names (same request). ``scope``
        keeps the keys of another kind of record (``videos:``) apart from jobs'."""
        redis_key = KEY_PREFIX + scope + tenant + ":" + hashlib.sha256(key.encode()).hexdigest()
        value = json.dumps({"fingerprint": digest, "job_id": job_id, "at": time.time()})
        deadline = time.monotonic() + SETTLE_S
        while True:
            if self._redis.set(redis_key, value, nx=True, ex=self._ttl_s):
                return Claim(redis_key, value)
            raw = self._redis.get(redis_key)
            if raw is None:
                continue  # released or expired since: claim it again
            held = json.loads(raw)
            if held["fingerprint"] != digest:
                raise IdempotencyConflict(
                    "this Idempotency-Key was used with a different request; use a new key for a new job"
                )
            job = jobs.get(held["job_id"])
            if job is not None:
                return job
            if time.time() - held["at"] > SETTLE_S:
                self._release(keys=[redis_key], args=[raw])
                continue
            if time.monotonic() > deadline:
                raise Conflict("a request with this Idempotency-Key is still being handled; try again")
            time.sleep(0.05)

    def release(self, claim: Claim) -> None:
        self._release(keys=[claim.redis_key], args=[claim.value])
