"""GPU worker throughput end to end, with batching off and on: jobs/s through Redis.

    python -m bench.throughput [--jobs 24] [--frames 6] [--new-tokens 48] [--batch 8]

Runs a real GPU worker process (the command of ``worker/cli/stack.py``: the tiny model on the CPU, one
torch thread) twice: with ``VIDEOQA_BATCH_SIZE=1`` (batching off, one job per generate call) and
with ``--batch``. Each time it queues ``--jobs`` jobs as the CPU stage leaves them (frames in a
local storage directory, status ``queued_gpu``, one generate message each in Redis) once the
worker is ready, then times from the first message to the last answer written. Both runs get the
same jobs; it prints jobs/s, new tokens/s, the mean batch size, the median latency, and the ratio.
The CPU stage is left out: it is the same with batching on or off. Redis: ``bench.harness``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import flush, service_env
from common import readiness
from common.celery_config import GENERATE_TASK, make_celery
from common.connections import redis_client
from common.jobs import JobStatus, JobStore
from common.settings import Settings, load_settings
from common.storage import open_store
from worker.cli.stack import Stack, gpu_worker_command
from worker.media.png import encode_png


def stored_frames(settings: Settings, jobs: int, frames: int, prefix: str = "bench") -> list[list[dict[str, object]]]:
    """Frames for every job, stored once and shared by both runs."""
    store = open_store(settings)
    rng = np.random.default_rng(zlib.crc32(prefix.encode()) if prefix != "bench" else 0)
    media = []
    for job in range(jobs):
        entries = []
        for index in range(frames):
            image = Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8))
            key = f"{prefix}/{job}/{index:04d}.png"
            store.put_bytes(key, encode_png(image), content_type="image/png")
            entries.append({"index": index, "time": index / 30, "key": key})
        media.append([{"kind": "video", "position": 0, "frames": entries}])
    return media


def create_gpu_jobs(
    jobs: JobStore,
    media: list[list[dict[str, object]]],
    new_tokens: int | list[int],
    status: JobStatus = JobStatus.QUEUED_GPU,
) -> list[str]:
    """Job records whose frames are already stored, at ``status`` (queued for or in generation);
    ``new_tokens`` for all of them, or one per job."""
    ids = []
    for number, job_media in enumerate(media):
        wanted = new_tokens[number] if isinstance(new_tokens, list) else new_tokens
        request = {
            "question": f"What happens in clip {number}?",
            "prompt": None,
            "videos": [{"kind": "upload", "location": "bench"}],
            "images": [],
            "sampling": {"num_frames": len(job_media[0]["frames"])},
            "generation": {"max_new_tokens": wanted},
        }
        job = jobs.create(request)
        jobs.transition(job.id, JobStatus.QUEUED_GPU, media=job_media)
        if status is JobStatus.GENERATING:
            jobs.transition(job.id, JobStatus.GENERATING)
        ids.append(job.id)
    return ids


def queue_jobs(
    settings: Settings, media: list[list[dict[str, object]]], new_tokens: int | list[int]
) -> tuple[list[str], float]:
    jobs = JobStore(redis_client(settings), ttl_s=3600)
    app = make_celery(settings)
    ids = create_gpu_jobs(jobs, media, new_tokens)
    started = time.time()
    for job_id in ids:
        app.send_task(GENERATE_TASK, args=[job_id])
    return ids, started


def run(
    env: dict[str, str],
    settings: Settings,
    media: list[list[dict[str, object]]],
    new_tokens: int | list[int],
    batch: int,
    log: Path,
    extra_env: dict[str, str] | None = None,
) -> dict[str, float]:
    """One GPU worker process over the jobs; figures of the run (``wall_s``: first message to
    last answer)."""
    flush()
    client = redis_client(settings)
    stack = Stack(env=env)
    with open(log, "ab") as handle:
        worker_env = {"VIDEOQA_BATCH_SIZE": str(batch), **(extra_env or {})}
        stack.start("gpu", gpu_worker_command(), extra_env=worker_env, stdout=handle, stderr=handle)
    try:
        deadline = time.monotonic() + 180
        while not readiness.ready_workers(client):
            if stack.exited() or time.monotonic() > deadline:
                raise SystemExit(f"the GPU worker did not become ready; see {log}")
            time.sleep(0.1)
        ids, started = queue_jobs(settings, media, new_tokens)
        store = JobStore(client, ttl_s=3600)
        while True:
            current = [store.get(job_id) for job_id in ids]
            if all(job is not None and job.status.terminal for job in current):
                break
            if stack.exited():
                raise SystemExit(f"the GPU worker died; see {log}")
            time.sleep(0.02)
    finally:
        stack.stop()
    failed = [job for job in current if job is None or job.status is not JobStatus.SUCCEEDED]
    if failed:
        raise SystemExit(f"{len(failed)} jobs did not succeed: {failed[0]}")
    finished = max(job.updated_at for job in current if job)
    latencies = [job.updated_at - started for job in current if job]
    sizes = [job.result["batch_size"] for job in current if job and job.result]
    tokens = sum(job.result["usage"]["completion_tokens"] for job in current if job and job.result)
    return {
        "wall_s": finished - started,
        "jobs_per_s": len(ids) / (finished - started),
        "mean_batch": statistics.mean(sizes),
        "median_latency_s": statistics.median(latencies),
        "tokens_per_s": tokens / (finished - started),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="videoqa-throughput-") as tmp:
        env = service_env(Path(tmp))
        model = env["VIDEOQA_MODEL"]
        settings = load_settings(env)
        media = stored_frames(settings, args.jobs, args.frames)
        print(f"{args.jobs} jobs of {args.frames} frames and {args.new_tokens} new tokens, model {model}, "
              f"one GPU worker process ({env['VIDEOQA_DEVICE']}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, "
              f"batch wait {settings.batch_wait_ms} ms)")  # fmt: skip
        print(f"{'batching':<12} {'jobs/s':>8} {'tokens/s':>9} {'mean batch':>10} {'median latency s':>17}")
        results = {}
        for label, batch in (("off (1)", 1), (f"on ({args.batch})", args.batch)):
            results[label] = run(env, settings, media, args.new_tokens, batch, Path(tmp) / "worker.log")
            r = results[label]
            print(
                f"{label:<12} {r['jobs_per_s']:>8.2f} {r['tokens_per_s']:>9.1f} "
                f"{r['mean_batch']:>10.1f} {r['median_latency_s']:>17.2f}"
            )
            flush()  # the next run starts from an empty broker; the frames stay stored
        off, on = results.values()
        print(f"batching on / off: {on['jobs_per_s'] / off['jobs_per_s']:.2f}x jobs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
