"""What the service benchmarks share: a Redis database of their own, the tiny model, a sample
video, the service's processes started with the commands of ``worker/cli/stack.py``, and percentiles.

The benchmarks flush their Redis database (``VIDEOQA_BENCH_REDIS_URL``, default database 14 of the
local Redis) before and after each run: never point it at a database that holds anything else.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from common.client import Client, Job
from worker.cli.demo import CACHE_DIR, ensure_tiny_model
from worker.cli.stack import ServicePlan, Stack, offline_cpu_env

REDIS_URL = os.environ.get("VIDEOQA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def flush(url: str = REDIS_URL) -> redis.Redis:
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    return client


def sample_video(workdir: Path) -> Path:
    from worker.fixtures.synthetic_videos import write_sample_videos

    return write_sample_videos(workdir / "videos")[0]


def service_env(workdir: Path, **extra: str) -> dict[str, str]:
    settings = {
        "VIDEOQA_REDIS_URL": REDIS_URL,
        "VIDEOQA_STORAGE_URL": str(workdir / "store"),
        "VIDEOQA_MODEL": str(ensure_tiny_model(CACHE_DIR / "tiny-model")),
        # The benchmarks submit faster than a client is allowed to by default.
        "VIDEOQA_RATE_LIMIT": "1000000/second",
        "VIDEOQA_MAX_ACTIVE_JOBS_PER_TENANT": "100000000",
    }
    return offline_cpu_env(os.environ, **{**settings, **extra})


@dataclass
class Running:
    client: Client
    env: dict[str, str]
    logs: Path

    def submit(self, video: Path, **fields: str) -> tuple[str, float]:
        """Posts one multipart job (flat ``fields``, as curl sends them); returns its id and the
        wall-clock time just before sending."""
        fields.setdefault("question", "What is the cat doing?")
        sent = time.time()
        job = self.client.submit_fields([video], **fields)
        return job.id, sent

    def wait(self, job_ids: Sequence[str], timeout_s: float = 600.0, poll_s: float = 0.25) -> dict[str, dict]:
        """The finished jobs' records (a failed job raises)."""
        return self.wait_for(job_ids, lambda job: Job.from_json(job).done, timeout_s, poll_s)

    def wait_for(
        self,
        job_ids: Sequence[str],
        reached: Callable[[dict], bool],
        timeout_s: float = 600.0,
        poll_s: float = 0.25,
    ) -> dict[str, dict]:
        """Until every job's record satisfies ``reached``; those records (a failed job raises).

        Every figure comes from the records' own timestamps, so polling slowly loses no precision,
        while polling fast would take the CPU the workers are measured on. With more than
        two jobs pending, each poll is one request for the newest jobs (the list endpoint), plus one
        per pending job not among them; otherwise one request per pending job.
        """
        pending = set(job_ids)
        records: dict[str, dict] = {}
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} jobs not there yet; logs in {self.logs}")
            seen: dict[str, Job] = {}
            if len(pending) > 2:
                seen = {job.id: job for job in self.client.list(limit=100).jobs if job.id in pending}
            for job_id in pending - seen.keys():
                seen[job_id] = self.client.get(job_id)
            for job_id, job in seen.items():
                if job.done and job.status != "succeeded":
                    raise RuntimeError(f"job {job_id} {job.status}: {job.error}")
                if reached(job.raw):
                    pending.discard(job_id)
                    records[job_id] = job.raw
            if pending:
                time.sleep(poll_s)
        return records


@contextmanager
def running(plan: ServicePlan, env: dict[str, str]) -> Iterator[Running]:
    """Starts ``plan``'s processes, each logging to a file of its own, waits until the API and
    every worker answer, and stops everything on the way out."""
    logs = Path(tempfile.mkdtemp(prefix="videoqa-bench-logs-"))
    stack = Stack(env=env, logs=logs)
    try:
        yield Running(stack.start_service(plan, wait_s=300), env, logs)
    finally:
        stack.stop()
