"""Service metrics kept in Redis, so every API process reports the same values.

Counters and histogram buckets live in one hash, ``videoqa:metrics``. The Lua script that makes a
job's terminal transition updates it in the same step (a job is counted once, however often its
task is redelivered), from what the job record holds; ``JobStore.create`` counts submissions.
``RedisCollector`` renders the hash, the broker's queue lengths and the ready GPU workers for
Prometheus at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

METRICS_KEY = "videoqa:metrics"
SUBMITTED_FIELD = "jobs:submitted"

# Stage timings a succeeded job's result carries, observed into ``videoqa_stage_seconds``.
STAGES = (
    "queue_wait", "download", "decode", "store_frames", "ingest", "queue_gpu", "load_frames", "generate", "total",
)  # fmt: skip
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
QUEUES = ("cpu", "gpu")

# kombu's Redis transport keeps a queue's messages under its name, and those sent with a priority
# under the name, a separator and the priority step.
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
_UNACKED_KEY = "unacked"


def _bound(value: float) -> str:
    return f"{value:g}"


def _lua_strings(values: Iterable[object]) -> str:
    return "{" + ", ".join(f"'{value}'" for value in values) + "}"


_OBSERVE_LUA = """
local function observe(key, name, value, bounds)
  redis.call('HINCRBYFLOAT', key, 'hist:' .. name .. ':sum', value)
  redis.call('HINCRBY', key, 'hist:' .. name .. ':count', 1)
  for _, le in ipairs(bounds) do
    if value <= tonumber(le) then
      redis.call('HINCRBY', key, 'hist:' .. name .. ':' .. le, 1)
      return
    end
  end
  redis.call('HINCRBY', key, 'hist:' .. name .. ':+Inf', 1)
end
"""

# Runs inside the job transition script once the new fields are written: ``fields`` is the table of
# what was written and KEYS[2] is METRICS_KEY. Buckets are stored as plain counts per bucket;
# the collector makes them cumulative.
TERMINAL_HOOK_LUA = (
    _OBSERVE_LUA
    + f"""
local terminal = {{succeeded = true, failed = true, cancelled = true}}
local new_status = fields['status']
if new_status and terminal[new_status] then
  local reason = ''
  if fields['error'] then
    local ok, err = pcall(cjson.decode, fields['error'])
    if ok and type(err) == 'table' and type(err['code']) == 'string' then reason = err['code'] end
  end
  redis.call('HINCRBY', KEYS[2], 'jobs:' .. new_status .. ':' .. reason, 1)
  if new_status == 'succeeded' and fields['result'] then
    local ok, result = pcall(cjson.decode, fields['result'])
    if ok and type(result) == 'table' then
      if type(result['timings']) == 'table' then
        for _, stage in ipairs({_lua_strings(STAGES)}) do
          local seconds = result['timings'][stage]
          if type(seconds) == 'number' then
            observe(KEYS[2], 'stage:' .. stage, seconds, {_lua_strings(map(_bound, LATENCY_BUCKETS))})
          end
        end
      end
      if type(result['batch_size']) == 'number' then
        observe(KEYS[2], 'batch_size', result['batch_size'], {_lua_strings(map(_bound, BATCH_BUCKETS))})
      end
      if type(result['usage']) == 'table' then
        for _, kind in ipairs({{'prompt', 'completion', 'cached'}}) do
          local tokens = result['usage'][kind .. '_tokens']
          if type(tokens) == 'number' then
            redis.call('HINCRBY', KEYS[2], 'tokens:' .. kind, math.floor(tokens))
          end
        end
      end
    end
  end
end
"""
)


def queue_keys(queue: str) -> list[str]:
    return [queue] + [f"{queue}{_PRIORITY_SEPARATOR}{step}" for step in _PRIORITY_STEPS]


def _histogram(
    name: str,
    documentation: str,
    labels: Sequence[str],
    bounds: Sequence[float],
    raw: dict[str, str],
    entries: dict[str, Sequence[str]],
) -> HistogramMetricFamily:
    """``entries`` maps each hash field prefix to its label values."""
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    for field, label_values in entries.items():
        if f"hist:{field}:count" not in raw:
            continue
        cumulative = 0.0
        buckets = []
        for bound in bounds:
            cumulative += float(raw.get(f"hist:{field}:{_bound(bound)}", 0))
            buckets.append((_bound(bound), cumulative))
        buckets.append(("+Inf", float(raw[f"hist:{field}:count"])))
        family.add_metric(list(label_values), buckets, float(raw.get(f"hist:{field}:sum", 0)))
    return family


class RedisCollector(Collector):
    """Reads everything at scrape time: two round trips to Redis, nothing kept in the process."""

    def __init__(self, client: redis.Redis, ready_gpu_workers: Callable[[], Sequence[str]]) -> None:
        self._redis = client
        self._ready_gpu_workers = ready_gpu_workers

    def collect(self) -> Iterator[Metric]:
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(METRICS_KEY)
            for queue in QUEUES:
                for key in queue_keys(queue):
                    pipe.llen(key)
            pipe.hlen(_UNACKED_KEY)
            replies = pipe.execute()
        raw: dict[str, str] = {_text(k): _text(v) for k, v in replies[0].items()}
        lengths = replies[1:-1]
        unacked = int(replies[-1])

        yield CounterMetricFamily(
            "videoqa_jobs_submitted", "Jobs accepted by the API.", value=float(raw.get(SUBMITTED_FIELD, 0))
        )
        finished = CounterMetricFamily(
            "videoqa_jobs_finished",
            "Jobs that reached a terminal state, by status and error code (empty on success).",
            labels=["status", "reason"],
        )
        for field, value in sorted(raw.items()):
            parts = field.split(":", 2)
            if len(parts) == 3 and parts[0] == "jobs" and parts[1] != "submitted":
                finished.add_metric([parts[1], parts[2]], float(value))
        yield finished

        yield _histogram(
            "videoqa_stage_seconds",
            "Seconds each stage of a succeeded job took (queue_wait: submission to ingest start).",
            ["stage"],
            LATENCY_BUCKETS,
            raw,
            {f"stage:{stage}": [stage] for stage in STAGES},
        )
        yield _histogram(
            "videoqa_batch_size",
            "Size of the batch each succeeded job was generated in (a batch of n counts n times).",
            [],
            BATCH_BUCKETS,
            raw,
            {"batch_size": []},
        )
        tokens = CounterMetricFamily("videoqa_tokens", "Tokens of succeeded jobs.", labels=["kind"])
        for kind in ("prompt", "completion", "cached"):
            tokens.add_metric([kind], float(raw.get(f"tokens:{kind}", 0)))
        yield tokens

        depth = GaugeMetricFamily("videoqa_queue_depth", "Tasks waiting in a broker queue.", labels=["queue"])
        per_queue = len(lengths) // len(QUEUES)
        for index, queue in enumerate(QUEUES):
            depth.add_metric([queue], float(sum(lengths[index * per_queue : (index + 1) * per_queue])))
        yield depth
        yield GaugeMetricFamily(
            "videoqa_tasks_unacked", "Tasks taken by a worker and not yet acknowledged.", value=float(unacked)
        )
        yield GaugeMetricFamily(
            "videoqa_gpu_workers_ready", "GPU workers with a model loaded and a fresh heartbeat.",
            value=float(len(self._ready_gpu_workers())),
        )  # fmt: skip


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
