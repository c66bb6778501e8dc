"""Horizontal scaling of GPU workers: jobs/s with one and with two GPU workers, in one run.

    python -m bench.scale                 # 16 jobs per configuration
    python -m bench.scale --jobs 32 --max-new-tokens 160

Each configuration starts the API (gunicorn, 1 process), one CPU worker and N GPU workers with the
commands of ``worker/cli/stack.py``: the tiny random-weight model on the CPU, one torch thread per
worker, batches of one job (``VIDEOQA_BATCH_SIZE=1``) so that the gain comes from the workers
alone. One warm-up job per worker first (it also stores the video's frames, which the measured
jobs then reuse). Then two runs of the same jobs:

- end to end: all submitted at once and followed through the job list (once a second: the figures
  come from the job records' own timestamps, and every poll takes CPU from the workers measured)
  until they succeed; jobs / (last job's end - first submission), with the GPU
  stage's own rate, jobs / (last generate end - first generate start), beside it. On this machine
  the CPU worker's ingests and the API share the two cores with the GPU workers, which GPUs would
  not.
- GPU stage with the queue full: the GPU workers stop consuming (Celery's ``cancel_consumer``),
  the jobs are submitted and ingested, and the workers resume (``add_consumer``). Each worker
  resumes at its own next poll of the broker (up to a second apart), so the rate is the steady
  one: each worker's jobs (from its log's job ids) over its own busy span, added up.

With one thread per worker on a 2-core machine the target ratio is >= 1.8x.

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
from typing import Any

from bench.harness import flush, running, sample_video, service_env
from common.celery_config import make_celery
from common.settings import load_settings
from worker.cli.stack import ServicePlan, free_port

# Polling the job list four times a second instead costs the API and this client 0.16 s of CPU
# per 32 jobs (a fifth of everything but generation), taken from the GPU workers.
POLL_S = 1.0


def measure(
    gpu_workers: int, jobs: int, max_new_tokens: int, video: Path, workdir: Path
) -> dict[str, dict[str, float]]:
    """Two runs of ``jobs`` on one service: end to end (submitted at once, ingest and generation
    overlapping), then with the GPU workers held back until every job is ingested."""
    flush()
    env = service_env(workdir / f"gpu{gpu_workers}", VIDEOQA_BATCH_SIZE="1")
    plan = ServicePlan(port=free_port(), api_workers=1, cpu_concurrency=1, gpu_workers=gpu_workers)
    names = plan.worker_names[1:]
    fields = {"num_frames": "2", "max_new_tokens": str(max_new_tokens)}
    celery = make_celery(load_settings(env))
    with running(plan, env) as service:
        service.wait([service.submit(video, **fields)[0] for _ in names])  # warm-up
        submitted = [service.submit(video, **fields) for _ in range(jobs)]
        done = service.wait([job_id for job_id, _ in submitted], poll_s=POLL_S)
        end_to_end = _figures(done, min(sent for _, sent in submitted))

        # Celery's own remote control: the GPU workers stop taking from the queue, the jobs are
        # ingested into it, and the workers resume with it full.
        _control(celery, "cancel_consumer", len(names))
        held = [service.submit(video, **fields)[0] for _ in range(jobs)]
        service.wait_for(held, lambda job: "start" in job["stages"].get("queue_gpu", {}), poll_s=POLL_S)
        resumed = time.time()
        _control(celery, "add_consumer", len(names))
        finished = service.wait(held, poll_s=POLL_S)
        queue_full = _figures(finished, resumed)
        # Each worker resumes at its own next poll of the broker (up to a second apart): the
        # steady rate is each worker's jobs over its own busy span, added up.
        queue_full["steady_jobs_per_s"] = sum(
            _busy_rate([finished[j] for j in _jobs_in_log(service.logs / f"{name}.log", finished)]) for name in names
        )
    flush()
    return {"end_to_end": end_to_end, "queue_full": queue_full}


def _jobs_in_log(path: Path, jobs: dict[str, dict[str, Any]]) -> set[str]:
    """The jobs among ``jobs`` that a worker's JSON log lines name."""
    named = set()
    for line in path.read_text().splitlines():
        try:
            job_id = json.loads(line).get("job_id")
        except (ValueError, AttributeError):
            continue
        if job_id in jobs:
            named.add(job_id)
    return named


def _busy_rate(done: list[dict[str, Any]]) -> float:
    if not done:
        return 0.0
    start = min(job["stages"]["generate"]["start"] for job in done)
    end = max(job["stages"]["generate"]["end"] for job in done)
    return len(done) / (end - start)


def _control(celery: Any, command: str, workers: int) -> None:
    """``command`` for the ``gpu`` queue, sent to the GPU workers only (a CPU worker told to add
    it would start taking GPU jobs)."""
    names = sorted(name for reply in celery.control.ping(timeout=1) for name in reply if name.startswith("gpu"))
    replies = getattr(celery.control, command)("gpu", destination=names, reply=True, timeout=5)
    answered = [name for reply in replies for name in reply]
    if len(names) != workers or sorted(answered) != names:
        raise RuntimeError(f"{command}: {workers} GPU workers expected to answer, got {answered}")


def _figures(done: dict[str, dict[str, Any]], origin: float) -> dict[str, float]:
    jobs = len(done)
    ended = max(job["updated_at"] for job in done.values())
    generate_start = min(job["stages"]["generate"]["start"] for job in done.values())
    generate_end = max(job["stages"]["generate"]["end"] for job in done.values())
    generate = sorted(job["result"]["timings"]["generate"] for job in done.values())
    tokens = sum(job["result"]["usage"]["completion_tokens"] for job in done.values())
    return {
        "seconds": ended - origin,
        "jobs_per_s": jobs / (ended - origin),
        "gpu_jobs_per_s": jobs / (generate_end - generate_start),
        "generate_s": generate[len(generate) // 2],
        "tokens_per_job": tokens / jobs,
    }


def generate_back_to_back(jobs: int, max_new_tokens: int, video: str) -> None:
    """A bare process doing a GPU worker's generation ``jobs`` times: loads first, says READY,
    starts on the parent's word, prints its seconds."""
    import torch

    from common.schemas import Generation, Sampling
    from common.settings import load_settings
    from worker.gpu.batch import generate_batch
    from worker.gpu.model import Prompt, load_model
    from worker.media.sampling import sample_frames

    torch.set_num_threads(1)
    loaded = load_model(load_settings())
    images = [frame.image for frame in sample_frames(Path(video), Sampling(num_frames=2))]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is the cat doing?"}]
    messages = [{"role": "user", "content": content}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = Prompt(text=text, images=images, generation=Generation(max_new_tokens=max_new_tokens))
    generate_batch(loaded, [prompt])  # warm-up, as the workers do before consuming
    print("READY", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    tokens = sum(generate_batch(loaded, [prompt])[0].completion_tokens for _ in range(jobs))
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
            "generate_s": seconds / share,
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
    print(f"{'processes':>11} {'seconds':>8} {'jobs/s':>8} {'generate s':>11} {'tokens/job':>11}")
    for n, row in ceiling.items():
        print(
            f"{n:>11} {row['seconds']:>8.2f} {row['jobs_per_s']:>8.2f} {row['generate_s']:>11.3f} "
            f"{row['tokens_per_job']:>11.1f}"
        )
    bare_ratio = ceiling[2]["jobs_per_s"] / ceiling[1]["jobs_per_s"]
    print(f"two processes / one: {bare_ratio:.2f}x")
    print()
    print(f"{args.jobs} jobs, up to {args.max_new_tokens} new tokens each, tiny model on the CPU, one thread each")
    print("end to end: all submitted at once; ingest, API and generation share the cores")
    header = f"{'GPU workers':>11} {'seconds':>8} {'jobs/s':>8} {'GPU-stage jobs/s':>17}"
    print(f"{header} {'generate s':>11} {'tokens/job':>11}")
    for n in (1, 2):
        row = rows[n]["end_to_end"]
        print(
            f"{n:>11} {row['seconds']:>8.2f} {row['jobs_per_s']:>8.2f} {row['gpu_jobs_per_s']:>17.2f} "
            f"{row['generate_s']:>11.3f} {row['tokens_per_job']:>11.1f}"
        )
    ratio = rows[2]["end_to_end"]["jobs_per_s"] / rows[1]["end_to_end"]["jobs_per_s"]
    print(_ratio_line(ratio, bare_ratio))
    print()
    print("GPU stage with the queue full: every job ingested before the GPU workers resume")
    print(f"{'GPU workers':>11} {'steady jobs/s':>14} {'generate s':>11} {'tokens/job':>11}")
    for n in (1, 2):
        row = rows[n]["queue_full"]
        print(f"{n:>11} {row['steady_jobs_per_s']:>14.2f} {row['generate_s']:>11.3f} {row['tokens_per_job']:>11.1f}")
    steady = rows[2]["queue_full"]["steady_jobs_per_s"] / rows[1]["queue_full"]["steady_jobs_per_s"]
    print(_ratio_line(steady, bare_ratio))


def _ratio_line(ratio: float, bare_ratio: float) -> str:
    return (
        f"two workers / one worker: {ratio:.2f}x jobs/s (target >= 1.8x); "
        f"{ratio / bare_ratio:.0%} of the machine's {bare_ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
