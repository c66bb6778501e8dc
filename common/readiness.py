"""GPU worker readiness: one Redis key per worker, refreshed while its model is loaded.

A GPU worker writes ``videoqa:worker:<hostname>`` (JSON, see ``WorkerReadiness``) once its
model is loaded and a warm-up generation ran, refreshes it every heartbeat interval with a TTL of
three intervals, and deletes it when it stops. A worker that dies without deleting it drops out
when the TTL runs out. The API's ``/readyz`` and operators read the keys through
``ready_workers`` without importing worker code:

    python -m common.readiness              # lists ready workers; exits 1 when there is none
    python -m common.readiness gpu0@host    # exits 0 only when that worker is ready
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import redis

KEY_PREFIX = "videoqa:worker:"
TTL_INTERVALS = 3


@dataclass(frozen=True)
class WorkerReadiness:
    hostname: str
    model: str
    revision: str | None  # the hub commit the weights came from; None for a local folder
    device: str  # "cuda:0" (as the process sees it) or "cpu"
    gpu: str | None  # e.g. "NVIDIA H100 80GB HBM3"; None on CPU
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES of the worker, the physical GPU it is pinned to
    dtype: str
    attn_implementation: str
    free_memory_bytes: int
    total_memory_bytes: int
    batch_size: int
    batch_wait_ms: int
    pid: int
    ready_since: float
    updated_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> WorkerReadiness:
        data: dict[str, Any] = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in data.items() if name in known})


def key(hostname: str) -> str:
    return KEY_PREFIX + hostname


def publish(client: redis.Redis, readiness: WorkerReadiness, *, interval_s: float) -> None:
    """Write or refresh the worker's key; it expires after ``TTL_INTERVALS`` missed refreshes."""
    ttl_ms = max(1000, int(interval_s * TTL_INTERVALS * 1000))
    client.set(key(readiness.hostname), readiness.to_json(), px=ttl_ms)


def withdraw(client: redis.Redis, hostname: str, *, pid: int | None = None) -> None:
    """Delete the worker's key (only if ``pid`` wrote it, when given: a restarted worker with the
    same hostname may already have published its own)."""
    if pid is None:
        client.delete(key(hostname))
        return
    current = client.get(key(hostname))
    if current is not None and WorkerReadiness.from_json(_text(current)).pid == pid:
        client.delete(key(hostname))


def ready_workers(client: redis.Redis) -> list[WorkerReadiness]:
    """Every GPU worker whose heartbeat has not expired, by hostname."""
    names = sorted(_text(name) for name in client.scan_iter(match=KEY_PREFIX + "*", count=100))
    if not names:
        return []
    values = client.mget(names)
    return [WorkerReadiness.from_json(_text(value)) for value in values if value is not None]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def main(argv: list[str] | None = None) -> int:
    from common.connections import redis_client
    from common.settings import load_settings

    args = sys.argv[1:] if argv is None else argv
    workers = ready_workers(redis_client(load_settings()))
    if args:
        workers = [worker for worker in workers if worker.hostname in args]
    now = time.time()
    for worker in workers:
        print(
            f"{worker.hostname}  {worker.model}  {worker.device} {worker.gpu or ''}  {worker.dtype} "
            f"{worker.attn_implementation}  batch {worker.batch_size}  "
            f"free {worker.free_memory_bytes / 2**30:.1f} GiB  seen {now - worker.updated_at:.1f} s ago"
        )
    return 0 if workers else 1


if __name__ == "__main__":
    sys.exit(main())
