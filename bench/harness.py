"""What the service benchmarks share: a Redis database of their own, the tiny model, a sample
video, the service's processes started with the commands of ``worker/cli/stack.py``, and percentiles.

The benchmarks flush their Redis database (``VIDEOQA_BENCH_REDIS_URL``, default database 14 of the
local Redis) before and after each run: never point it at a database that holds anything else.
"""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from api.submission import GENERATION_FIELDS, SAMPLING_FIELDS
from common.client import Client
from common.settings import load_settings
from worker.cli.demo import CACHE_DIR, ensure_tiny_model
from worker.cli.stack import Stack, offline_cpu_env, wait_for_http, wait_for_workers

REDIS_URL = os.environ.get("VIDEOQA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
TERMINAL = {"succeeded", "failed", "cancelled"}


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
    base_url: str
    env: dict[str, str]
    logs: Path

    def __post_init__(self) -> None:
        self.client = Client(self.base_url)

    def submit(self, video: Path, **fields: str) -> tuple[str, float]:
        """Posts one multipart job (flat ``fields``, as curl sends them); returns its id and the
        wall-clock time just before sending."""
        sampling = {name: fields.pop(name) for name in SAMPLING_FIELDS if name in fields}
        generation = {name: fields.pop(name) for name in GENERATION_FIELDS if name in fields}
        fields.setdefault("question", "What is the cat doing?")
        sent = time.time()
        job = self.client.submit([video], sampling=sampling, generation=generation, **fields)
        return job.id, sent

    def wait(
        self, job_ids: Sequence[str], timeout_s: float = 600.0, poll_s: float = 0.25
    ) -> dict[str, dict]:
        """The finished jobs' records (a failed job raises)."""
        return self.wait_for(job_ids, lambda job: job["status"] in TERMINAL, timeout_s, poll_s)

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
            seen: dict[str, dict] = {}
            if len(pending) > 2:
                listed = self.client.list(limit=100).jobs
                seen = {job.id: job.raw for job in listed if job.id in pending}
            for job_id in pending - seen.keys():
                seen[job_id] = self.client.get(job_id).raw
            for job_id, job in seen.items():
                if job["status"] in TERMINAL and job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
                if reached(job):
                    pending.discard(job_id)
                    records[job_id] = job
            if pending:
                time.sleep(poll_s)
        return records


@contextmanager
def running(processes: dict[str, list[str]], env: dict[str, str], *, workers: Sequence[str] = ()) -> Iterator[Running]:
    """Starts ``processes`` (name -> argv; ``api`` gets a free port appended by the caller), waits
    for the API and the named workers, and stops everything on the way out."""
    logs = Path(tempfile.mkdtemp(prefix="videoqa-bench-logs-"))
    stack = Stack(env=env)
    base_url = ""
    try:
        for name, argv in processes.items():
            with open(logs / f"{name}.log", "ab") as handle:  # the process keeps its own copy
                stack.start(name, argv, stdout=handle, stderr=subprocess.STDOUT)
            if name == "api":
                bind = argv[argv.index("--bind") + 1]
                base_url = f"http://{bind}"
        if base_url:
            wait_for_http(f"{base_url}/healthz")
        if workers:
            wait_for_workers(load_settings(env), list(workers), timeout_s=300)
        yield Running(base_url, env, logs)
    finally:
        stack.stop()

