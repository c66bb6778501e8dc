"""The ``videoqa`` command."""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

import click

from worker.cli.ask import ask
from worker.cli.demo import DEMO_QUESTION, TINY_MODEL_DIR, ensure_tiny_model, run_demo
from worker.cli.stack import (
    Stack,
    api_command,
    cpu_worker_command,
    flower_command,
    flower_env,
    gpu_worker_command,
    http_ok,
)


@click.group()
def main() -> None:
    """videoqa: ask questions about videos."""


main.add_command(ask)


@main.command("tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True)
def tiny_model(directory: Path, seed: int) -> None:
    """Build the tiny random-weight LLaVA into DIRECTORY (loadable with from_pretrained)."""
    from worker.fixtures.tiny_model import build_tiny_model

    click.echo(str(build_tiny_model(directory, seed=seed)))


@main.command("api-key")
@click.argument("tenant")
def api_key(tenant: str) -> None:
    """Make a new API key for TENANT: prints the key (shown once) and its VIDEOQA_API_KEYS entry."""
    from common.api_keys import hash_key, new_key

    key = new_key()
    click.echo(f"key:   {key}")
    click.echo(f"entry: {tenant}:{hash_key(key)}")
    click.echo("Add the entry to VIDEOQA_API_KEYS (comma-separated; append :s3://bucket/prefix/ to allow s3 inputs).")


@main.command("sample-videos")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def sample_videos(directory: Path) -> None:
    """Write the two generated sample cat videos into DIRECTORY."""
    from worker.fixtures.synthetic_videos import write_sample_videos

    for path in write_sample_videos(directory):
        click.echo(str(path))


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--api-workers", default=2, show_default=True, help="gunicorn worker processes")
@click.option("--cpu-concurrency", default=2, show_default=True, help="ingest processes")
@click.option("--gpu-workers", default=1, show_default=True, help="GPU worker processes (one per GPU)")
@click.option("--flower/--no-flower", default=False, help="also start Flower on 127.0.0.1:5555")
@click.option("--tiny", is_flag=True, help=f"run on the tiny random-weight model (built once into {TINY_MODEL_DIR})")
def up(
    host: str, port: int, api_workers: int, cpu_concurrency: int, gpu_workers: int, flower: bool, tiny: bool
) -> None:
    """Run the API, a CPU worker and GPU workers in the foreground until Ctrl-C."""
    env = dict(os.environ)
    if tiny:
        env["VIDEOQA_MODEL"] = str(ensure_tiny_model(TINY_MODEL_DIR))
    check_startup(env)
    stack = Stack(env=env, die_with_parent=True)
    stack.start("api", api_command(host, port, api_workers))
    stack.start("cpu", cpu_worker_command(cpu_concurrency))
    for gpu in range(gpu_workers):
        pinned = {"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu_workers > 1 else {}
        stack.start(f"gpu{gpu}", gpu_worker_command(f"gpu{gpu}"), extra_env=pinned)
    if flower:
        # Flower can revoke tasks and shut workers down: never without a password.
        auth = os.environ.get("FLOWER_BASIC_AUTH", "")
        if ":" not in auth:
            auth = f"admin:{secrets.token_urlsafe(12)}"
            click.echo(f"Flower on http://127.0.0.1:5555 as {auth} (set FLOWER_BASIC_AUTH=user:password to choose)")
        user, password = auth.split(":", 1)
        stack.start("flower", flower_command(), extra_env=flower_env(user, password))
    signal.signal(signal.SIGTERM, _interrupt)
    # A shell starts background commands with SIGINT ignored, and the ignore is inherited across
    # exec: without this, "Ctrl-C stops it" would not hold for an `up` started by a script.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    failed = False
    try:
        click.echo("starting the API, the CPU worker and the GPU worker; waiting until /readyz answers 200")
        ready_url = f"http://{_local(host)}:{port}/readyz"
        ready = False
        while not (dead := stack.exited()):
            if not ready and http_ok(ready_url):
                ready = True
                click.echo(f"videoqa is ready: http://{host}:{port}/v1/jobs (Ctrl-C stops it)")
            time.sleep(0.5)
        failed = True
        click.echo(f"stopping: {', '.join(f'{n} exited with {c}' for n, c in dead.items())}", err=True)
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        stack.stop()
    if failed:
        raise SystemExit(1)


def _local(host: str) -> str:
    # A wildcard bind answers on loopback too.
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, host)


def check_startup(env: dict[str, str]) -> None:
    """Refuse to start, in one line, what could only fail later: bad settings, no model."""
    from common.settings import SettingsError, load_settings
    from worker.cli.model_check import model_problem

    try:
        settings = load_settings(env)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    problem = model_problem(settings.model)
    if problem is not None:
        raise click.ClickException(problem)


@main.command("gpu-workers")
@click.option("--gpus", default=None, help="comma-separated GPU indices, e.g. 0,2 (default: every visible GPU)")
def gpu_workers(gpus: str | None) -> None:
    """One GPU worker per GPU, pinned and restarted when it dies, until Ctrl-C."""
    from worker.cli.gpu_supervisor import run_gpu_workers

    try:
        requested = [int(part) for part in gpus.split(",") if part.strip()] if gpus else None
        raise SystemExit(run_gpu_workers(requested, say=click.echo))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@main.command()
@click.option("--question", default=DEMO_QUESTION, show_default=True)
@click.option("--num-frames", default=6, show_default=True)
@click.option("--timeout", "timeout_s", default=600.0, show_default=True)
def demo(question: str, num_frames: int, timeout_s: float) -> None:
    """Start everything on this machine, ask the sample question about two generated videos."""
    run_demo(question, num_frames, timeout_s)
