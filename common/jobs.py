"""Job records in Redis: our own keys, guarded state transitions, a terminal state written once.

Every status change also appends an event to the job's stream (common.events) in the same step,
so a watcher never misses a change nor sees one twice.
"""

from __future__ import annotations

import builtins
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import redis

from common.errors import TooManyActiveJobs
from common.events import EVENTS_MAXLEN, STATUS_EVENT_LUA, events_key
from common.handoff import VERSION_FIELD as HANDOFF_VERSION_FIELD
from common.job_status import ACTIVE, TERMINAL, JobStatus
from common.metrics import METRICS_KEY, SUBMITTED_FIELD, TERMINAL_HOOK_LUA

KEY_PREFIX = "videoqa:job:"
INDEX_KEY = "videoqa:jobs"
TENANT_INDEX_PREFIX = "videoqa:jobs:"
ACTIVE_PREFIX = "videoqa:active:"
DEFAULT_TENANT = "public"
# The record's field holding a webhook's delivery state; present only on jobs that asked for one.
WEBHOOK_FIELD = "webhook"

log = logging.getLogger(__name__)


# Compare-and-set in one round trip: the status moves only from an allowed one, so a redelivered
# or late task can never overwrite a terminal state or move a job backwards. A terminal transition
# also updates the metrics hash (KEYS[2]) in the same script, so each job is counted exactly once,
# and a change of status appends its event to the job's stream (KEYS[3]).
_TRANSITION = (
    """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
local allowed = cjson.decode(ARGV[1])
for _, s in ipairs(allowed) do
  if s == status then
    local fields = cjson.decode(ARGV[2])
    for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
    if ARGV[3] == '1' then
      local tenant = redis.call('HGET', KEYS[1], 'tenant') or ''
      redis.call('SREM', ARGV[4] .. tenant, redis.call('HGET', KEYS[1], 'id'))
    end
"""
    + TERMINAL_HOOK_LUA
    + STATUS_EVENT_LUA
    + """
    return 1
  end
end
return 0
"""
)


# A field written to a record only while it exists: a write arriving after the record expired (or
# was removed) must not bring it back as a key that never expires. ARGV: command (HSET or
# HINCRBY), field, value, TTL for a record found without one.
_UPDATE_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local result = redis.call(ARGV[1], KEYS[1], ARGV[2], ARGV[3])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return result
"""


@dataclass(frozen=True)
class Job:
    id: str
    status: JobStatus
    tenant: str
    created_at: float
    updated_at: float
    attempts: int
    request: dict[str, Any]
    media: list[dict[str, Any]] | None = None
    ingest_timings: dict[str, float] = field(default_factory=dict)
    # Of the CPU stage's hand-off (``media``, ``ingest_timings``): common.handoff reads them.
    handoff_version: int = 1
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    webhook: dict[str, Any] | None = None

    def stage_seconds(self) -> dict[str, float]:
        return {
            name: round(times["end"] - times["start"], 4)
            for name, times in self.stages.items()
            if "start" in times and "end" in times
        }

    def to_public(self) -> dict[str, Any]:
        """The record as the API shows it (frame storage keys are internal)."""
        seconds = self.stage_seconds()
        return {
            "id": self.id,
            "tenant": self.tenant,
            "status": str(self.status),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            # The same instants for people and for tools that parse ISO 8601.
            "created_at_iso": iso8601(self.created_at),
            "updated_at_iso": iso8601(self.updated_at),
            "attempts": self.attempts,
            "request": self.request,
            "result": self.result,
            "error": self.error,
            "stages": {
                name: {**times, **({"seconds": seconds[name]} if name in seconds else {})}
                for name, times in self.stages.items()
            },
            "webhook": self.webhook,
        }


def iso8601(timestamp: float) -> str:
    """``2026-12-01T12:04:05.123Z``: UTC, to the millisecond."""
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _decode(raw: dict[str, str]) -> Job:
    stages: dict[str, dict[str, float]] = {}
    for key, value in raw.items():
        if key.startswith("stage:"):
            _, name, edge = key.split(":", 2)
            stages.setdefault(name, {})[edge] = float(value)

    def loads(name: str) -> Any:
        return json.loads(raw[name]) if raw.get(name) else None

    return Job(
        id=raw["id"],
        status=JobStatus(raw["status"]),
        tenant=raw.get("tenant", DEFAULT_TENANT),
        created_at=float(raw["created_at"]),
        updated_at=float(raw["updated_at"]),
        attempts=int(raw.get("attempts", 0)),
        request=loads("request") or {},
        media=loads("media"),
        ingest_timings=loads("ingest_timings") or {},
        handoff_version=int(raw.get(HANDOFF_VERSION_FIELD) or 1),
        result=loads("result"),
        error=loads("error"),
        stages=stages,
        webhook=loads(WEBHOOK_FIELD),
    )


decode_job = _decode


class JobStore:
    """All reads and writes of job records go through here."""

    def __init__(self, client: redis.Redis, *, ttl_s: int, on_terminal: Callable[[str], None] | None = None) -> None:
        """``on_terminal`` is called with the id of each job this store moves to a terminal state."""
        self._redis = client
        self._ttl_s = ttl_s
        self._on_terminal = on_terminal
        self._transition = client.register_script(_TRANSITION)
        self._update_existing = client.register_script(_UPDATE_EXISTING)

    @property
    def client(self) -> redis.Redis:
        return self._redis

    @staticmethod
    def key(job_id: str) -> str:
        return KEY_PREFIX + job_id

    def create(
        self,
        request: dict[str, Any],
        *,
        job_id: str | None = None,
        tenant: str = DEFAULT_TENANT,
        max_active: int | None = None,
        webhook: bool = False,
        media: list[dict[str, Any]] | None = None,
    ) -> Job:
        """Store a new queued job; with ``max_active``, raise ``TooManyActiveJobs`` instead when
        the tenant already has that many jobs not yet ended. With ``webhook``, the record starts
        an empty delivery state. With ``media`` (every frame stored already), the job starts
        ``queued_gpu``: it has no CPU stage."""
        job_id = job_id or uuid.uuid4().hex
        now = time.time()
        fields = {
            "id": job_id,
            "tenant": tenant,
            "status": str(JobStatus.QUEUED),
            "created_at": repr(now),
            "updated_at": repr(now),
            "attempts": "0",
            "request": json.dumps(request),
        }
        if media is not None:
            fields["status"] = str(JobStatus.QUEUED_GPU)
            fields["media"] = json.dumps(media)
            fields["stage:queue_gpu:start"] = repr(now)
        if webhook:
            fields[WEBHOOK_FIELD] = json.dumps(
                {"attempts": 0, "last_status": None, "last_error": None, "delivered_at": None}
            )
        active = ACTIVE_PREFIX + tenant
        with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if max_active:
                        # The count and the creation in one transaction: EXEC fails when another
                        # job joined (or left) the set meanwhile, and the count is read again, so
                        # concurrent submissions never pass the cap together.
                        pipe.watch(active)
                        if pipe.scard(active) >= max_active:
                            raise TooManyActiveJobs(max_active)
                        pipe.multi()
                    pipe.hset(
                        self.key(job_id), mapping=cast("dict[Any, Any]", fields)
                    )  # redis-py: keys of any encodable type
                    pipe.expire(self.key(job_id), self._ttl_s)
                    pipe.zadd(INDEX_KEY, {job_id: now})
                    pipe.hincrby(METRICS_KEY, SUBMITTED_FIELD, 1)
                    pipe.zadd(TENANT_INDEX_PREFIX + tenant, {job_id: now})
                    pipe.sadd(active, job_id)
                    pipe.xadd(
                        events_key(job_id),
                        {"event": "status", "data": json.dumps(fields)},
                        maxlen=EVENTS_MAXLEN,
                        approximate=True,
                    )
                    pipe.expire(events_key(job_id), self._ttl_s)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        return _decode(fields)

    def get(self, job_id: str) -> Job | None:
        raw = cast("dict[str, str]", self._redis.hgetall(self.key(job_id)))  # the client decodes replies
        return _decode(raw) if raw else None

    def transition(
        self,
        job_id: str,
        to: JobStatus | None,
        *,
        allowed_from: frozenset[JobStatus] | set[JobStatus] = ACTIVE,
        **fields: Any,
    ) -> bool:
        """Set ``status`` to ``to`` (or keep it, when None) and write ``fields``, only if the job is
        currently in ``allowed_from``. Values that are not strings are stored as JSON."""
        encoded = {name: value if isinstance(value, str) else json.dumps(value) for name, value in fields.items()}
        encoded["updated_at"] = repr(time.time())
        if to is not None:
            encoded["status"] = str(to)
        ends = "1" if to is not None and to in TERMINAL else "0"
        outcome = self._transition(
            keys=[self.key(job_id), METRICS_KEY, events_key(job_id)],
            args=[
                json.dumps(sorted(str(s) for s in allowed_from)),
                json.dumps(encoded),
                ends,
                ACTIVE_PREFIX,
                EVENTS_MAXLEN,
            ],
        )
        if outcome == 1 and ends == "1" and self._on_terminal is not None:
            try:
                self._on_terminal(job_id)
            except Exception:
                # The job's outcome is stored; a hook that fails (broker down) must not undo it.
                log.exception("terminal hook failed for job %s", job_id)
        return bool(outcome == 1)

    def _update(self, job_id: str, command: str, name: str, value: str | int) -> Any:
        """``command`` on one field of the record if it still exists; None when it does not."""
        return self._update_existing(keys=[self.key(job_id)], args=[command, name, value, self._ttl_s])

    def mark(self, job_id: str, stage: str, edge: str, at: float | None = None) -> None:
        """Record when a stage started or ended (``edge`` is ``start`` or ``end``); nothing when
        the record is gone."""
        self._update(job_id, "HSET", f"stage:{stage}:{edge}", repr(at if at is not None else time.time()))

    def record_webhook(self, job_id: str, state: dict[str, Any]) -> None:
        """Store a webhook's delivery state; nothing when the record is gone."""
        self._update(job_id, "HSET", WEBHOOK_FIELD, json.dumps(state))

    def add_attempt(self, job_id: str) -> int:
        return int(self._update(job_id, "HINCRBY", "attempts", 1) or 0)

    def begin_attempt(self, job_id: str, max_attempts: int) -> bool:
        """Count one more delivery of the job's current stage; False (and the job failed with
        ``poison``) when deliveries that ended without an outcome reach ``max_attempts``: the job
        keeps killing its worker. Retries after transient errors (``note_retry``) do not count.
        False too when the record is gone."""
        attempts = self._update(job_id, "HINCRBY", "attempts", 1)
        if attempts is None:
            return False
        retries = self._redis.hget(self.key(job_id), "retries")
        lost = int(attempts) - int(retries or 0) - 1
        if lost >= max_attempts:
            self.fail(job_id, "poison", f"the job ended its worker {lost} times; not tried again")
            return False
        return True

    def note_retry(self, job_id: str) -> None:
        self._update(job_id, "HINCRBY", "retries", 1)

    def succeed(self, job_id: str, result: dict[str, Any]) -> bool:
        return self.transition(job_id, JobStatus.SUCCEEDED, allowed_from={JobStatus.GENERATING}, result=result)

    def fail(self, job_id: str, code: str, message: str) -> bool:
        return self.transition(job_id, JobStatus.FAILED, error={"code": code, "message": message})

    def cancel(self, job_id: str) -> bool:
        return self.transition(
            job_id, JobStatus.CANCELLED, error={"code": "cancelled", "message": "cancelled by the client"}
        )

    def is_cancelled(self, job_id: str) -> bool:
        return self._redis.hget(self.key(job_id), "status") == JobStatus.CANCELLED

    def active_count(self, tenant: str) -> int:
        """Jobs of ``tenant`` not yet ended (each leaves the set in its terminal transition)."""
        return int(self._redis.scard(ACTIVE_PREFIX + tenant))

    def list(
        self,
        *,
        limit: int,
        before: float | None = None,
        tenant: str | None = None,
        statuses: frozenset[JobStatus] | None = None,
    ) -> list[Job]:
        """Newest first; ``before`` is the ``created_at`` of the last job of the previous page.
        With ``tenant``, only that tenant's jobs; with ``statuses``, only jobs in one of them."""
        index = INDEX_KEY if tenant is None else TENANT_INDEX_PREFIX + tenant
        cutoff = time.time() - self._ttl_s
        self._redis.zremrangebyscore(index, "-inf", cutoff)
        upper = f"({before}" if before is not None else "+inf"
        if not statuses:
            ids = cast("list[str]", self._redis.zrevrangebyscore(index, upper, "-inf", start=0, num=limit))
            return self._load(ids)
        # The index holds no status: walk it newest first, a chunk at a time, until the page is full.
        wanted = {str(status) for status in statuses}
        found: list[str] = []
        chunk = max(limit, 100)
        while len(found) < limit:
            scored = cast(  # the client decodes replies
                "list[tuple[str, float]]",
                self._redis.zrevrangebyscore(index, upper, "-inf", start=0, num=chunk, withscores=True),
            )
            if not scored:
                break
            with self._redis.pipeline(transaction=False) as pipe:
                for job_id, _ in scored:
                    pipe.hget(self.key(job_id), "status")
                current = pipe.execute()
            found += [job_id for (job_id, _), status in zip(scored, current, strict=True) if status in wanted]
            # A score cursor, not an offset: jobs created meanwhile do not shift what comes next.
            upper = f"({scored[-1][1]!r}"
        return [job for job in self._load(found[:limit]) if job.status in statuses]

    # `builtins.list`: in this class `list` is the method above.
    def _load(self, ids: builtins.list[str]) -> builtins.list[Job]:
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.key(job_id))
            raws = pipe.execute()
        return [_decode(raw) for raw in raws if raw]
