"""Pipeline overhead and submission throughput, each beside its bare floor, in one run.

    python -m bench.overhead                  # 60 sequential jobs, two 10 s bursts
    python -m bench.overhead --jobs 100 --burst-seconds 20

1. Overhead: one job at a time through the real API (gunicorn, 2 processes), CPU worker and GPU
   worker (tiny model, batches of one so no batching wait is counted): seconds from just before
   the POST to the GPU task taking the job (its ``queue_gpu`` end), minus the ingest work the job
   record reports (download, decode, storing frames). What is left is HTTP, validation, Redis
   writes, two broker hops and the task bookkeeping. Floor: a bare Celery 5.7 chain of two no-op
   tasks (cpu queue -> gpu queue, same broker, same reliability settings), send to gpu start.
2. Burst: wrk (a second process; `apt-get install wrk`) posts a small JSON job with 16
   connections for N seconds to the API under gunicorn (2 processes, no workers running): accepted
   (202) jobs/s and latency percentiles. Floor: a bare Flask app under gunicorn (2 processes) that
   validates the body with pydantic, writes one Redis hash and sends one Celery task.

Targets on this 2-core machine: overhead < 15 ms p50; >= 700 accepted jobs/s with p99 < 50 ms.
The machine may be shared: compare the rows of one run only.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from bench.floors import LATENCIES_KEY, celery_app
from bench.harness import REDIS_URL, flush, percentile, running, sample_video, service_env
from worker.cli.stack import ServicePlan, Stack, api_command, free_port, wait_for_http

CONNECTIONS = 16


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


@contextmanager
def file_server(directory: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


# -- 1. overhead --------------------------------------------------------------------------------


def bare_chain(count: int) -> list[float]:
    """Send-to-start seconds of the gpu task of a bare cpu -> gpu chain, one chain at a time."""
    client = flush()
    stack = Stack(env={"VIDEOQA_BENCH_REDIS_URL": REDIS_URL, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    with open(Path(tempfile.mkdtemp(prefix="videoqa-bench-logs-")) / "bare.log", "ab") as logs:
        for queue in ("bare_cpu", "bare_gpu"):  # each worker keeps its own copy of the log
            stack.start(queue, [sys.executable, "-m", "celery", "--quiet", "-A", "bench.floors:celery_app", "worker",
                                "--queues", queue, "--concurrency", "1", "--hostname", f"{queue}@%h", "--loglevel", "WARNING"],
                        stdout=logs, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(celery_app.control.ping(timeout=0.5)) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the bare workers did not start")
        latencies = []
        for i in range(count + 5):
            celery_app.send_task("bare.cpu", args=[time.time()], queue="bare_cpu")
            popped = client.blpop([LATENCIES_KEY], timeout=30)
            if popped is None:
                raise TimeoutError("a bare chain did not finish")
            if i >= 5:  # the first chains warm the connections up
                latencies.append(float(popped[1]))
        return latencies
    finally:
        stack.stop()
        logs.close()


def service_overhead(count: int, workdir: Path, video_url: str) -> dict[str, list[float]]:
    flush()
    env = service_env(workdir / "overhead", VIDEOQA_BATCH_SIZE="1", VIDEOQA_FETCH_ALLOWLIST="127.0.0.1")
    plan = ServicePlan(port=free_port(), api_workers=2, cpu_concurrency=1)
    parts: dict[str, list[float]] = {
        "overhead": [],
        "post": [],
        "queue_wait": [],
        "ingest_bookkeeping": [],
        "handoff": [],
    }
    with running(plan, env) as service:
        for i in range(count + 5):
            sent = time.time()
            job_id = service.client.submit(
                [video_url], "What is the cat doing?", sampling={"num_frames": 2}, generation={"max_new_tokens": 1}
            ).id
            answered = time.time()
            # One job at a time: quick polls cost little and keep the run short.
            job = service.wait([job_id], poll_s=0.02)[job_id]
            if i < 5:  # warm-up: the first job also samples and stores the frames
                continue
            stages = job["stages"]
            work = sum(job["result"]["timings"].get(name, 0.0) for name in ("download", "decode", "store_frames"))
            gpu_start = stages["queue_gpu"]["end"]
            parts["overhead"].append(gpu_start - sent - work)
            parts["post"].append(answered - sent)
            parts["queue_wait"].append(stages["ingest"]["start"] - job["created_at"])
            parts["ingest_bookkeeping"].append(stages["ingest"]["end"] - stages["ingest"]["start"] - work)
            parts["handoff"].append(gpu_start - stages["ingest"]["end"])
    flush()
    return parts


# -- 2. burst -----------------------------------------------------------------------------------

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) accepted = 0 end
function response(status, headers, body) if status == 202 then accepted = accepted + 1 end end
function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("accepted") end
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d\\n", summary.requests, total, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def wrk(url: str, body: dict[str, object], seconds: float, workdir: Path) -> dict[str, float]:
    script = workdir / "post.lua"
    script.write_text(_WRK_SCRIPT % json.dumps(body))
    argv = ["wrk", "-t", "2", "-c", str(CONNECTIONS), "-d", f"{seconds:g}s", "--timeout", "5s", "-s", str(script), url]
    output = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    requests_, accepted, duration_us, p50_us, p99_us, errors = (int(v) for v in line.split()[1:])
    seconds_run = duration_us / 1e6
    return {
        "requests_per_s": requests_ / seconds_run,
        "accepted_per_s": accepted / seconds_run,
        "refused": requests_ - accepted,
        "p50_ms": p50_us / 1000,
        "p99_ms": p99_us / 1000,
        "socket_errors": errors,
    }


def burst(
    command: Callable[[int], list[str]], env: dict[str, str], body: dict[str, object], seconds: float, workdir: Path
) -> dict[str, float]:
    """wrk against the server ``command(port)`` starts, after a 2 s warm-up."""
    flush()
    port = free_port()
    stack = Stack(env=env)
    with open(workdir / f"burst-{port}.log", "ab") as log:  # the server keeps its own copy
        stack.start("api", command(port), stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1/jobs"
        wait_for_http(f"http://127.0.0.1:{port}/v1/jobs")
        wrk(url, body, 2, workdir)  # warm-up
        flush()
        return wrk(url, body, seconds, workdir)
    finally:
        stack.stop()
        flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--burst-seconds", type=float, default=10.0)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed for the burst (a second process): apt-get install wrk")
    redis.Redis.from_url(REDIS_URL).ping()
    with tempfile.TemporaryDirectory(prefix="videoqa-bench-overhead-") as tmp:
        workdir = Path(tmp)
        video = sample_video(workdir)
        with file_server(video.parent) as files:
            video_url = f"{files}/{video.name}"
            floor = bare_chain(args.jobs)
            ours = service_overhead(args.jobs, workdir, video_url)

            body = {"question": "What is the cat doing?", "videos": [{"url": video_url}]}
            bare = burst(
                lambda port: [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                              "bench.floors:bare_flask_app()"],
                {**service_env(workdir), "VIDEOQA_BENCH_REDIS_URL": REDIS_URL}, body, args.burst_seconds, workdir,
            )  # fmt: skip
            api_env = service_env(workdir / "burst", VIDEOQA_FETCH_ALLOWLIST="127.0.0.1")
            api = burst(lambda port: api_command(port=port, workers=2), api_env, body, args.burst_seconds, workdir)

    print(f"1. POST to GPU task start, minus ingest work ({args.jobs} jobs, one at a time), ms")
    print(f"{'':34}{'p50':>8}{'p90':>8}{'p99':>8}")
    print(
        f"{'bare Celery cpu->gpu chain (floor)':34}{_ms(percentile(floor, 50))} {_ms(percentile(floor, 90))} {_ms(percentile(floor, 99))}"
    )
    for name, values in ours.items():
        label = "videoqa overhead" if name == "overhead" else f"  of which {name}"
        print(f"{label:34}{_ms(percentile(values, 50))} {_ms(percentile(values, 90))} {_ms(percentile(values, 99))}")
    print(f"overhead p50 = {percentile(ours['overhead'], 50) / percentile(floor, 50):.1f}x the floor; target < 15 ms")
    print()
    print(f"2. Burst: wrk, {CONNECTIONS} connections, {args.burst_seconds:g} s, gunicorn with 2 processes")
    print(f"{'':34}{'req/s':>9}{'accepted/s':>11}{'p50 ms':>8}{'p99 ms':>8}{'refused':>8}")
    for label, row in (("bare Flask + Redis + Celery (floor)", bare), ("videoqa POST /v1/jobs", api)):
        print(
            f"{label:34}{row['requests_per_s']:>9.0f}{row['accepted_per_s']:>11.0f}{row['p50_ms']:>8.1f}{row['p99_ms']:>8.1f}{row['refused']:>8.0f}"
        )
    print(
        f"accepted jobs/s = {api['accepted_per_s'] / bare['accepted_per_s']:.2f}x the floor; target >= 700/s with p99 < 50 ms"
    )


if __name__ == "__main__":
    main()
