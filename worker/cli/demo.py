"""``videoqa demo``: the whole service on one machine, answering the sample two-video question."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import click

from common.client import Client, Job, VideoQAError, WaitTimedOut
from common.settings import DEFAULT_STORAGE_DIR, load_settings
from worker.cli.stack import (
    Stack,
    api_command,
    cpu_worker_command,
    free_port,
    gpu_worker_command,
    redis_answers,
    wait_for_http,
    wait_for_workers,
)

DEMO_QUESTION = "Are these two cats in these two videos doing the same thing?"
CACHE_DIR = Path.home() / ".cache" / "videoqa"
TINY_MODEL_DIR = CACHE_DIR / "tiny-model"


def ensure_tiny_model(directory: Path) -> Path:
    if not (directory / "config.json").exists():
        from worker.fixtures.tiny_model import build_tiny_model

        click.echo(f"building the tiny random-weight model in {directory}")
        build_tiny_model(directory)
    return directory


def demo_environment(env: dict[str, str], stack: Stack, workdir: Path) -> dict[str, str]:
    """Fill in what the user left unset: a model, a reachable Redis, storage."""
    env = dict(env)
    if not env.get("VIDEOQA_MODEL"):
        env["VIDEOQA_MODEL"] = str(ensure_tiny_model(TINY_MODEL_DIR))
    redis_url = env.setdefault("VIDEOQA_REDIS_URL", "redis://127.0.0.1:6379/0")
    if not redis_answers(redis_url):
        parsed = urlparse(redis_url)
        server = shutil.which("redis-server")
        if server is None or parsed.hostname not in {"127.0.0.1", "localhost"}:
            raise click.ClickException(f"nothing answers at {redis_url} and no local redis-server to start")
        port = parsed.port or 6379
        click.echo(f"starting redis-server on port {port}")
        stack.start("redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                              "--dir", str(workdir)], stdout=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while not redis_answers(redis_url):
            if time.monotonic() > deadline:
                raise click.ClickException("redis-server did not start")
            time.sleep(0.1)
    if not env.get("VIDEOQA_STORAGE_URL"):
        if env.get("AWS_ENDPOINT_URL") or env.get("VIDEOQA_S3_ENDPOINT_URL"):
            env["VIDEOQA_STORAGE_URL"] = "s3://videoqa/demo"
        else:
            env["VIDEOQA_STORAGE_URL"] = str(DEFAULT_STORAGE_DIR)
    load_settings(env)  # fail here, with the operator's message, rather than in three children
    return env


def submit_and_wait(base_url: str, videos: list[Path], question: str, num_frames: int, timeout_s: float) -> Job:
    client = Client(base_url, timeout=60)
    try:
        job = client.submit(videos, question, sampling={"num_frames": num_frames})
        click.echo(f"job {job.id} accepted; waiting for it at {base_url}/v1/jobs/{job.id}")
        return client.wait(job.id, timeout_s)
    except WaitTimedOut:
        raise click.ClickException(f"the job did not finish within {timeout_s:.0f} s") from None
    except VideoQAError as exc:
        raise click.ClickException(f"submission refused: {exc}") from None


def print_outcome(job: Job) -> None:
    if job.status != "succeeded" or job.result is None:
        raise click.ClickException(f"job {job.status}: {job.error}")
    result = job.result
    click.echo(f"\nQuestion: {job.raw['request']['question']}")
    click.echo(f"Answer:   {result.answer!r}")
    click.echo(f"Model:    {result.model}")
    frames = ", ".join(f"v{f.video}#{f.index}@{f.time:.2f}s" for f in result.frames)
    click.echo(f"Frames:   {frames}")
    click.echo(f"Tokens:   {result.raw['usage']}")
    click.echo("Timings (s):")
    for stage, seconds in result.timings.items():
        click.echo(f"  {stage:<14}{seconds:8.3f}")


def run_demo(question: str, num_frames: int, timeout_s: float) -> None:
    from worker.fixtures.synthetic_videos import write_sample_videos

    with tempfile.TemporaryDirectory(prefix="videoqa-demo-") as tmp:
        workdir = Path(tmp)
        stack = Stack(env={})
        log_path = workdir / "stack.log"
        try:
            env = demo_environment({**os.environ}, stack, workdir)
            stack.env = env
            port = free_port()
            with open(log_path, "ab") as log:
                for name, argv in (
                    ("api", api_command(port=port)),
                    ("cpu", cpu_worker_command(concurrency=1)),
                    ("gpu", gpu_worker_command()),
                ):
                    stack.start(name, argv, stdout=log, stderr=subprocess.STDOUT)
            base_url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{base_url}/healthz")
            click.echo("waiting for the CPU and GPU workers")
            wait_for_workers(load_settings(env), ["cpu", "gpu0"])
            videos = write_sample_videos(workdir / "videos")
            click.echo(f"submitting {', '.join(v.name for v in videos)} with {num_frames} frames each")
            job = submit_and_wait(base_url, videos, question, num_frames, timeout_s)
            print_outcome(job)
        except BaseException:
            if log_path.exists():
                sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
            raise
        finally:
            stack.stop()
