"""What streaming an answer's tokens costs batched generation.

    python -m bench.streaming [--jobs 16] [--frames 2] [--new-tokens 48] [--batch 8] [--rounds 3]

1. Through the running stack: the API (gunicorn, the command of ``worker/cli/stack.py``) and one GPU
   worker process (the tiny model on the CPU, one torch thread, ``VIDEOQA_BATCH_SIZE=--batch``).
   ``--jobs`` jobs are queued as the CPU stage leaves them (frames stored, status ``queued_gpu``,
   one generate message each), alternately with no one watching and with one Server-Sent Events
   client per job on ``GET /v1/jobs/{id}/events`` reading every event to ``done``; jobs/s and new
   tokens/s from the records' own times, median of ``--rounds`` rounds each, and their ratio. Also
   the CPU seconds each side used per round (from /proc): the GPU worker's own (what streaming
   adds to generation, whatever else runs on the machine), the API's and the listeners'. On a
   machine with few cores the tiny model on the CPU shares them with the API and the listeners,
   so wall-clock figures there include that competition; the CPU seconds separate it out.
2. In this process: the same batch through ``worker.gpu.batch.run_batch`` without a token stream
   and with one publishing each step's text to Redis (``common.events``), alternately, median
   seconds per batch, the ratio, the time the token stream takes per step and per round trip.

Redis: ``bench.harness`` (its database is flushed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.harness import flush, service_env
from bench.throughput import create_gpu_jobs, stored_frames
from common import readiness
from common.celery_config import GENERATE_TASK, make_celery
from common.connections import redis_client
from common.events import JobEvents
from common.jobs import JobStatus, JobStore
from common.settings import Settings, load_settings
from worker.cli.stack import Stack, api_command, free_port, gpu_worker_command, wait_for_http


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its children, living or reaped (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state, ppid, ..., utime (12), stime (13), cutime (14), cstime (15).
        if int(entry) == pid or int(fields[1]) == pid:
            total += sum(int(value) for value in fields[11:15]) / tick
    return total


class Listener(threading.Thread):
    """One SSE client reading a job's events to ``done``."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.connected = threading.Event()
        self.tokens = 0
        self.done = False

    def run(self) -> None:
        with requests.get(self.url, stream=True, timeout=(10, 600)) as response:
            self.connected.set()
            kind = ""
            for line in response.iter_lines(decode_unicode=True):
                assert isinstance(line, str)  # decoded, as asked
                if line.startswith("event: "):
                    kind = line[len("event: ") :]
                elif line.startswith("data: ") and kind == "token":
                    self.tokens += bool(json.loads(line[len("data: ") :])["text"])
                elif line.startswith("data: ") and kind == "done":
                    self.done = True
                    return


def stack_round(
    settings: Settings,
    base_url: str,
    media: list[list[dict[str, object]]],
    new_tokens: int,
    listen: bool,
    pids: dict[str, int],
) -> dict[str, float]:
    client = redis_client(settings)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    own_before = time.process_time()
    jobs = JobStore(client, ttl_s=3600)
    ids = create_gpu_jobs(jobs, media, new_tokens, JobStatus.QUEUED_GPU)
    listeners = [Listener(f"{base_url}/v1/jobs/{job_id}/events") for job_id in ids] if listen else []
    for listener in listeners:
        listener.start()
    for listener in listeners:
        listener.connected.wait(30)
    app = make_celery(settings)
    started = time.time()
    for job_id in ids:
        app.send_task(GENERATE_TASK, args=[job_id])
    while True:
        current = [jobs.get(job_id) for job_id in ids]
        if all(job is not None and job.status.terminal for job in current):
            break
        time.sleep(0.05)
    for listener in listeners:
        listener.join(60)
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    if any(job is None or job.status is not JobStatus.SUCCEEDED for job in current):
        raise SystemExit(f"a job did not succeed: {current}")
    if listeners and not all(listener.done for listener in listeners):
        raise SystemExit("a listener did not see its job's done event")
    finished = max(job.updated_at for job in current if job)
    tokens = sum(job.result["usage"]["completion_tokens"] for job in current if job and job.result)
    return {
        "jobs_per_s": len(ids) / (finished - started),
        "tokens_per_s": tokens / (finished - started),
        "mean_batch": statistics.mean(job.result["batch_size"] for job in current if job and job.result),
        "events_read": sum(listener.tokens for listener in listeners),
        "gpu_worker_cpu_s": cpu["gpu"],
        "api_cpu_s": cpu["api"],
        "listeners_cpu_s": time.process_time() - own_before,
    }


def through_the_stack(
    env: dict[str, str], settings: Settings, args: argparse.Namespace, media: list, logs: Path
) -> None:
    port = free_port()
    stack = Stack(env=env)
    with open(logs / "api.log", "ab") as api_log, open(logs / "gpu.log", "ab") as gpu_log:
        api = stack.start("api", api_command(port=port), stdout=api_log, stderr=api_log)
        gpu = stack.start(
            "gpu",
            gpu_worker_command(),
            extra_env={"VIDEOQA_BATCH_SIZE": str(args.batch)},
            stdout=gpu_log,
            stderr=gpu_log,
        )
    pids = {"api": api.pid, "gpu": gpu.pid}
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base_url}/healthz")
        deadline = time.monotonic() + 300
        while not readiness.ready_workers(redis_client(settings)):
            if stack.exited() or time.monotonic() > deadline:
                raise SystemExit(f"the GPU worker did not become ready; see {logs}")
            time.sleep(0.2)
        results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        stack_round(settings, base_url, media, args.new_tokens, False, pids)  # warm-up, not counted
        for round_ in range(args.rounds):
            for listen in (False, True) if round_ % 2 == 0 else (True, False):
                results[listen].append(stack_round(settings, base_url, media, args.new_tokens, listen, pids))
    finally:
        stack.stop()
    print(f"{'listeners':<10} {'jobs/s':>8} {'tokens/s':>9} {'mean batch':>10} {'token events read':>18} "
          f"{'CPU s: GPU worker':>18} {'API':>6} {'listeners':>10}")  # fmt: skip
    medians = {}
    for listen, rounds in results.items():
        medians[listen] = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
        m = medians[listen]
        label = f"{args.jobs} SSE" if listen else "none"
        print(f"{label:<10} {m['jobs_per_s']:>8.2f} {m['tokens_per_s']:>9.1f} {m['mean_batch']:>10.1f} {m['events_read']:>18.0f} "
              f"{m['gpu_worker_cpu_s']:>18.2f} {m['api_cpu_s']:>6.2f} {m['listeners_cpu_s']:>10.2f}")  # fmt: skip
    on, off = medians[True], medians[False]
    print(f"with / without listeners: {on['tokens_per_s'] / off['tokens_per_s']:.3f}x tokens/s, "
          f"{on['gpu_worker_cpu_s'] / off['gpu_worker_cpu_s']:.3f}x GPU worker CPU seconds")  # fmt: skip


def in_process(settings: Settings, args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from common.schemas import Generation
    from worker.gpu.batch import BatchItem, run_batch
    from worker.gpu.model import Prompt, load_model
    from worker.gpu.token_stream import TokenStream

    torch.set_num_threads(1)
    loaded = load_model(settings)
    rng = np.random.default_rng(0)
    items = []
    for row in range(args.batch):
        images = [Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)) for _ in range(args.frames)]
        content = [{"type": "image"}] * args.frames + [{"type": "text", "text": f"What happens in clip {row}?"}]
        text = loaded.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        items.append(
            BatchItem("", Prompt(text=text, images=images, generation=Generation(max_new_tokens=args.new_tokens)))
        )
    client = redis_client(settings)
    jobs, events = JobStore(client, ttl_s=3600), JobEvents(client)
    publish_s: list[float] = []
    step_s: list[float] = []

    def timed_publish(texts: dict[str, str]) -> None:
        started = time.perf_counter()
        events.publish_tokens(texts)
        publish_s.append(time.perf_counter() - started)

    class TimedStream(TokenStream):
        def step(self, new_tokens: dict[str, int]) -> None:
            started = time.perf_counter()
            super().step(new_tokens)
            step_s.append(time.perf_counter() - started)

    def one_batch(stream: bool) -> tuple[float, int]:
        ids = create_gpu_jobs(
            jobs, [[{"kind": "video", "position": 0, "frames": []}]] * args.batch, args.new_tokens, JobStatus.GENERATING
        )
        batch = [BatchItem(job_id, item.prompt) for job_id, item in zip(ids, items, strict=True)]
        tokens_stream = TimedStream(loaded.processor.tokenizer, loaded.eos_token_ids, timed_publish) if stream else None
        started = time.perf_counter()
        outcomes = run_batch(loaded, batch, tokens=tokens_stream)
        if tokens_stream is not None:
            tokens_stream.close()
        return time.perf_counter() - started, sum(o.generated_tokens for o in outcomes.values())

    for stream in (False, True):
        one_batch(stream)  # warm-up, not counted
    publish_s.clear()
    step_s.clear()
    times: dict[bool, list[float]] = {False: [], True: []}
    tokens = 0
    for round_ in range(args.rounds):
        # Alternating which goes first, so neither always runs on a cache the other warmed.
        for stream in (False, True) if round_ % 2 == 0 else (True, False):
            seconds, tokens = one_batch(stream)
            times[stream].append(seconds)
    without, with_stream = statistics.median(times[False]), statistics.median(times[True])
    print(f"batch of {args.batch}, {tokens} new tokens: without token stream {without:.3f} s, with {with_stream:.3f} s "
          f"(median of {args.rounds}); ratio {with_stream / without:.3f}x")  # fmt: skip
    print(f"token stream per step (decode, and a round trip when one is due): {statistics.median(step_s) * 1e3:.3f} ms "
          f"median, {sum(step_s) / args.rounds / with_stream:.1%} of a batch")  # fmt: skip
    print(f"per round trip: {statistics.median(publish_s) * 1e3:.3f} ms median, "
          f"{len(publish_s) / args.rounds:.0f} round trips per batch of {len(step_s) / args.rounds:.0f} steps")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="videoqa-streaming-") as tmp:
        flush()
        env = service_env(Path(tmp))
        settings = load_settings(env)
        media = stored_frames(settings, args.jobs, args.frames)
        print(f"{args.jobs} jobs of {args.frames} frames and {args.new_tokens} new tokens, model {env['VIDEOQA_MODEL']}, "
              f"{env['VIDEOQA_DEVICE']}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, {args.rounds} rounds")  # fmt: skip
        print("1. through the stack (API + GPU worker)")
        through_the_stack(env, settings, args, media, Path(tmp))
        print("2. in this process (run_batch)")
        in_process(settings, args)
        flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
