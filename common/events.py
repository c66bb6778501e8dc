"""Each job's events, in a Redis stream of its own: what watchers and waiting requests read.

Three kinds, as the API serves them: ``status`` (the record after each change of status), ``token``
(``{"text": ...}``, the answer's new text as the GPU worker generates it) and ``done`` (the final
record; nothing follows it). The stream ids are the events' ids, so a reader resumes after the
last one it saw, from any API process, with no state kept between requests.

Status events are appended by the job's transition itself (``STATUS_EVENT_LUA`` runs inside
common.jobs' script), token events by ``publish_tokens`` only while the job is ``generating``:
no token follows the ``done`` of a job cancelled mid-generation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import redis

STATUS = "status"
TOKEN = "token"
DONE = "done"
# From the start: XREAD and XRANGE take the last id seen, exclusive.
START = "0-0"
# Far above a job's own events (a handful of statuses and at most max_new_tokens tokens); trimmed
# approximately, which Redis does by whole nodes, at no cost per append.
EVENTS_MAXLEN = 8192


# common.jobs.KEY_PREFIX, which imports this module.
_RECORD_PREFIX = "videoqa:job:"


def events_key(job_id: str) -> str:
    return f"{_RECORD_PREFIX}{job_id}:events"


# Appended to common.jobs' transition, after the new fields were written. In scope: ``status``
# (the one before), ``fields`` (what was written), KEYS[1] the record, KEYS[3] the stream, ARGV[5]
# the stream's length cap. Only a change of status is an event: a redelivered task that moves a
# job to the state it already has adds nothing. The stream lives exactly as long as the record.
STATUS_EVENT_LUA = """
local moved_to = fields['status']
if moved_to and moved_to ~= status then
  local flat = redis.call('HGETALL', KEYS[1])
  local record = {}
  for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
  local data = cjson.encode(record)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'event', 'status', 'data', data)
  if moved_to == 'succeeded' or moved_to == 'failed' or moved_to == 'cancelled' then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'event', 'done', 'data', data)
  end
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
end
"""

# KEYS: the record, the stream; ARGV: the event's data, the length cap. NOMKSTREAM: a stream that
# expired with its record is not brought back without a TTL.
_TOKEN = """
if redis.call('HGET', KEYS[1], 'status') ~= 'generating' then return 0 end
redis.call('XADD', KEYS[2], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[2], '*', 'event', 'token', 'data', ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Event:
    id: str
    kind: str
    data: dict[str, Any]  # status and done: the record's stored fields; token: {"text": ...}


def _event(entry_id: str, fields: dict[str, str]) -> Event:
    return Event(id=entry_id, kind=fields["event"], data=json.loads(fields["data"]))


class JobEvents:
    """Reading and appending job events; the client must decode responses."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._token = client.register_script(_TOKEN)

    def read(self, job_id: str, after: str = START, *, block_ms: int | None = None, count: int = 500) -> list[Event]:
        """Events after the id ``after``, oldest first; with ``block_ms``, waits that long for the
        first one when there is none yet (an empty list then)."""
        # The client decodes replies to str; redis-py types them for every protocol and setting.
        answer = cast(
            "list[tuple[str, list[tuple[str, dict[str, str]]]]]",
            self._redis.xread({events_key(job_id): after}, count=count, block=block_ms),
        )
        if not answer:
            return []
        _, entries = answer[0]
        return [_event(entry_id, fields) for entry_id, fields in entries]

    def last_id(self, job_id: str) -> str:
        """The id of the job's latest event, to wait for the ones after it."""
        latest = self._redis.xrevrange(events_key(job_id), count=1)
        return str(latest[0][0]) if latest else START

    def publish_tokens(self, texts: dict[str, str]) -> None:
        """One token event per job of ``texts`` (job id -> new text), in one round trip."""
        if not texts:
            return
        try:
            self._append_tokens(texts)
        except redis.exceptions.NoScriptError:
            # First use, or Redis restarted since: load the script once, not before every call.
            self._redis.script_load(_TOKEN)
            self._append_tokens(texts)

    def _append_tokens(self, texts: dict[str, str]) -> None:
        # EVALSHA by hand: a Script object in a pipeline asks SCRIPT EXISTS before each execute,
        # a second round trip per step.
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id, text in texts.items():
                keys = [_RECORD_PREFIX + job_id, events_key(job_id)]
                pipe.evalsha(self._token.sha, len(keys), *keys, json.dumps({"text": text}), EVENTS_MAXLEN)
            pipe.execute()
