"""Horizontal scaling of GPU workers: jobs/s with one and with two GPU workers, in one run.

    python -m bench.scale                 # 16 jobs per configuration
    python -m bench.scale --jobs 32 --max-new-tokens 160

Each configuration starts the API (gunicorn, 1 process), one CPU worker and N GPU workers with the
commands of ``worker/stack.py``: the tiny random-weight model on the CPU, one torch thread per
worker, batches of one job (``VIDEOQA_BATCH_SIZE=1``) so that the gain comes from the workers
alone. One warm-up job per worker first (it also stores the video's frames, which the measured
jobs then reuse), then all jobs are submitted at once and polled until they succeed. Throughput is
jobs / (last job's end - first submission); the GPU stage's own rate, jobs / (last generate end
- first generate start), is printed beside it. With one thread per worker on a 2-core machine the
target ratio is >= 1.8x. The machine may be shared: compare the rows of one run only.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.harness import flush, running, sample_video, service_env
from worker.stack import api_command, cpu_worker_command, free_port, gpu_worker_command


def measure(gpu_workers: int, jobs: int, max_new_tokens: int, video: Path, workdir: Path) -> dict[str, float]:
    flush()
    env = service_env(workdir / f"gpu{gpu_workers}", VIDEOQA_BATCH_SIZE="1")
    names = [f"gpu{i}" for i in range(gpu_workers)]
    processes = {
        "api": api_command(port=free_port(), workers=1),
        "cpu": cpu_worker_command(concurrency=1),
        **{name: gpu_worker_command(name) for name in names},
    }
    fields = {"num_frames": "2", "max_new_tokens": str(max_new_tokens)}
    with running(processes, env, workers=["cpu", *names]) as service:
        service.wait([service.submit(video, **fields)[0] for _ in names])  # warm-up
        submitted = [service.submit(video, **fields) for _ in range(jobs)]
        done = service.wait([job_id for job_id, _ in submitted])
    first_sent = min(sent for _, sent in submitted)
    ended = max(job["updated_at"] for job in done.values())
    generate_start = min(job["stages"]["generate"]["start"] for job in done.values())
    generate_end = max(job["stages"]["generate"]["end"] for job in done.values())
    tokens = sum(job["result"]["usage"]["completion_tokens"] for job in done.values())
    flush()
    return {
        "seconds": ended - first_sent,
        "jobs_per_s": jobs / (ended - first_sent),
        "gpu_jobs_per_s": jobs / (generate_end - generate_start),
        "tokens_per_job": tokens / jobs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=120)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="videoqa-bench-scale-") as tmp:
        workdir = Path(tmp)
        video = sample_video(workdir)
        rows = {n: measure(n, args.jobs, args.max_new_tokens, video, workdir) for n in (1, 2)}
    print(f"{args.jobs} jobs, up to {args.max_new_tokens} new tokens each, tiny model on the CPU, one thread per worker")
    print(f"{'GPU workers':>11} {'seconds':>8} {'jobs/s':>8} {'GPU-stage jobs/s':>17} {'tokens/job':>11}")
    for n, row in rows.items():
        print(f"{n:>11} {row['seconds']:>8.2f} {row['jobs_per_s']:>8.2f} {row['gpu_jobs_per_s']:>17.2f} {row['tokens_per_job']:>11.1f}")
    ratio = rows[2]["jobs_per_s"] / rows[1]["jobs_per_s"]
    gpu_ratio = rows[2]["gpu_jobs_per_s"] / rows[1]["gpu_jobs_per_s"]
    print(f"two workers / one worker: {ratio:.2f}x jobs/s (GPU stage {gpu_ratio:.2f}x); target >= 1.8x")


if __name__ == "__main__":
    main()
