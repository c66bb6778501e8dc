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
target ratio is >= 1.8x.

The machine's own ceiling is measured in the same run: the same generation (same model, prompt
and token budget, one torch thread) in one bare process, then in two at once, with no service
around them. The service can scale no better than the machine does. The machine may be shared:
compare the rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
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


def generate_back_to_back(jobs: int, max_new_tokens: int, video: str) -> None:
    """A bare process doing a GPU worker's generation ``jobs`` times: loads first, says READY,
    starts on the parent's word, prints its seconds."""
    import torch

    from common.schemas import Generation, Sampling
    from common.settings import load_settings
    from worker.frames import sample_frames
    from worker.inference import Prompt, generate, load_model

    torch.set_num_threads(1)
    loaded = load_model(load_settings())
    images = [frame.image for frame in sample_frames(Path(video), Sampling(num_frames=2))]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is the cat doing?"}]
    messages = [{"role": "user", "content": content}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = Prompt(text=text, images=images, generation=Generation(max_new_tokens=max_new_tokens))
    generate(loaded, [prompt])  # warm-up, as the workers do before consuming
    print("READY", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    tokens = sum(generate(loaded, [prompt])[0].completion_tokens for _ in range(jobs))
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - started, "tokens": tokens}), flush=True)


def machine_ceiling(jobs: int, max_new_tokens: int, video: Path, workdir: Path) -> dict[int, dict[str, float]]:
    """Jobs/s of ``jobs`` bare generations in one process, and split over two running at once."""
    env = service_env(workdir / "ceiling")
    rows: dict[int, dict[str, float]] = {}
    for processes in (1, 2):
        share = jobs // processes
        argv = [sys.executable, "-m", "bench.scale", "--generate-child", str(share), str(max_new_tokens), str(video)]
        children = [
            subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(processes)
        ]
        for child in children:
            assert child.stdout is not None
            while (line := child.stdout.readline()) and line.strip() != "READY":
                pass
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            output, _ = child.communicate(timeout=600)
            results.append(json.loads(output.split("RESULT ", 1)[1]))
        seconds = max(result["seconds"] for result in results)
        rows[processes] = {
            "seconds": seconds,
            "jobs_per_s": share * processes / seconds,
            "tokens_per_job": sum(result["tokens"] for result in results) / (share * processes),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=120)
    parser.add_argument("--generate-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_child:
        jobs, max_new_tokens, video = args.generate_child
        generate_back_to_back(int(jobs), int(max_new_tokens), video)
        return
    with tempfile.TemporaryDirectory(prefix="videoqa-bench-scale-") as tmp:
        workdir = Path(tmp)
        video = sample_video(workdir)
        ceiling = machine_ceiling(args.jobs, args.max_new_tokens, video, workdir)
        rows = {n: measure(n, args.jobs, args.max_new_tokens, video, workdir) for n in (1, 2)}
    print("the machine's ceiling: the same generation in bare processes, no service")
    print(f"{'processes':>11} {'seconds':>8} {'jobs/s':>8} {'tokens/job':>11}")
    for n, row in ceiling.items():
        print(f"{n:>11} {row['seconds']:>8.2f} {row['jobs_per_s']:>8.2f} {row['tokens_per_job']:>11.1f}")
    bare_ratio = ceiling[2]["jobs_per_s"] / ceiling[1]["jobs_per_s"]
    print(f"two processes / one: {bare_ratio:.2f}x")
    print()
    print(f"{args.jobs} jobs, up to {args.max_new_tokens} new tokens each, tiny model on the CPU, one thread per worker")
    print(f"{'GPU workers':>11} {'seconds':>8} {'jobs/s':>8} {'GPU-stage jobs/s':>17} {'tokens/job':>11}")
    for n, row in rows.items():
        print(f"{n:>11} {row['seconds']:>8.2f} {row['jobs_per_s']:>8.2f} {row['gpu_jobs_per_s']:>17.2f} {row['tokens_per_job']:>11.1f}")
    ratio = rows[2]["jobs_per_s"] / rows[1]["jobs_per_s"]
    gpu_ratio = rows[2]["gpu_jobs_per_s"] / rows[1]["gpu_jobs_per_s"]
    print(f"two workers / one worker: {ratio:.2f}x jobs/s (GPU stage {gpu_ratio:.2f}x); target >= 1.8x")
    print(f"the service's scaling as a share of the machine's: {ratio / bare_ratio:.0%}")


if __name__ == "__main__":
    main()
