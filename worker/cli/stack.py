"""The commands that run each part of the service, and the one way to start them together.

README, ``docker/`` and the tests use these same command lines; ``videoqa up``, ``videoqa demo``,
the tests and the benchmarks start a service with ``Stack.start_service`` and talk to it with
``common.client.Client``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
import requests

from common.celery_config import make_celery
from common.client import Client
from common.settings import Settings, load_settings


def offline_cpu_env(base: Mapping[str, str], **overrides: str) -> dict[str, str]:
    """``base`` without any service or AWS configuration, plus what a single-machine run on the
    tiny model wants: CPU, one torch thread per process, no hub access. For tests and benchmarks."""
    env = {
        key: value for key, value in base.items() if not key.startswith(("VIDEOQA_", "AWS_", "CUDA_VISIBLE_DEVICES"))
    }
    env.update(
        {
            "VIDEOQA_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(overrides)
    return env


def api_command(host: str = "127.0.0.1", port: int = 8000, workers: int = 2, threads: int = 32) -> list[str]:
    # Threads, so that clients waiting on a job (``?wait=``, event streams) each hold a thread
    # blocked on Redis, not a whole process, and submissions still find one free.
    return [
        sys.executable, "-m", "gunicorn",
        "--bind", f"{host}:{port}",
        "--workers", str(workers),
        "--worker-class", "gthread",
        "--threads", str(threads),
        "--access-logfile", "-",
        "--logger-class", "api.logs.JsonLogger",
        "api.app:create_app()",
    ]  # fmt: skip


def cpu_worker_command(concurrency: int = 2, name: str = "cpu") -> list[str]:
    return [
        sys.executable, "-m", "celery", "--quiet", "-A", "worker.cpu_app", "worker",
        "--queues", "cpu",
        "--concurrency", str(concurrency),
        "--hostname", f"{name}@%h",
        "--loglevel", "INFO",
    ]  # fmt: skip


def gpu_worker_command(name: str = "gpu0") -> list[str]:
    # One process per GPU: a single task slot, the model loaded once in it.
    return [
        sys.executable, "-m", "celery", "--quiet", "-A", "worker.gpu_app", "worker",
        "--queues", "gpu",
        "--concurrency", "1",
        "--hostname", f"{name}@%h",
        "--loglevel", "INFO",
    ]  # fmt: skip


def flower_command(port: int = 5555, address: str = "127.0.0.1") -> list[str]:
    # Credentials travel in FLOWER_BASIC_AUTH (flower_env), never in argv where `ps` shows them.
    return [
        sys.executable, "-m", "celery", "-A", "worker.cpu_app", "flower",
        f"--port={port}", f"--address={address}",
    ]  # fmt: skip


def flower_env(user: str, password: str) -> dict[str, str]:
    """Flower reads any option from a ``FLOWER_``-prefixed variable; this one turns on basic auth."""
    if not user or not password or ":" in user:
        raise ValueError("Flower needs a user (without ':') and a password")
    return {"FLOWER_BASIC_AUTH": f"{user}:{password}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def wait_for_http(url: str, timeout_s: float = 30.0) -> None:
    """Until ``url`` answers below 500: for servers other than the API (object storage, Flower,
    test servers); the API's own is ``Client.wait_until_up``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def wait_for_workers(settings: Settings, prefixes: Sequence[str], timeout_s: float = 120.0) -> None:
    """Until a worker whose name starts with each prefix answers a ping (it is consuming)."""
    app = make_celery(settings)
    deadline = time.monotonic() + timeout_s
    missing = list(prefixes)
    while time.monotonic() < deadline:
        names = [name for reply in app.control.ping(timeout=0.5) for name in reply]
        missing = [prefix for prefix in prefixes if not any(name.startswith(prefix + "@") for name in names)]
        if not missing:
            return
    raise TimeoutError(f"workers {missing} did not come up within {timeout_s:.0f} s")


def local_address(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine: a wildcard bind answers on
    loopback too."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, host)


@dataclass(frozen=True)
class ServicePlan:
    """The processes of a service on one machine: the API, one CPU worker and GPU workers, each
    GPU worker pinned to its own GPU when there are several."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_workers: int = 2
    cpu_concurrency: int = 2
    gpu_workers: int = 1

    @property
    def base_url(self) -> str:
        return f"http://{local_address(self.host)}:{self.port}"

    @property
    def worker_names(self) -> list[str]:
        """The workers' names, as their hostnames start (``wait_for_workers``)."""
        return ["cpu", *(f"gpu{gpu}" for gpu in range(self.gpu_workers))]

    def processes(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        """Each process's name, command and the environment it adds."""
        processes: dict[str, tuple[list[str], dict[str, str]]] = {
            "api": (api_command(self.host, self.port, self.api_workers), {}),
            "cpu": (cpu_worker_command(self.cpu_concurrency), {}),
        }
        for gpu in range(self.gpu_workers):
            pinned = {"CUDA_VISIBLE_DEVICES": str(gpu)} if self.gpu_workers > 1 else {}
            processes[f"gpu{gpu}"] = (gpu_worker_command(f"gpu{gpu}"), pinned)
        return processes


_PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Stack:
    """Child processes started together and stopped together (SIGTERM, then SIGKILL). With
    ``logs``, each writes its output to ``<logs>/<name>.log`` unless told otherwise."""

    env: Mapping[str, str]
    logs: Path | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Each child gets SIGTERM from the kernel when the process that started it dies, so a
    # supervisor killed outright (SIGKILL, out of memory) leaves no workers behind. The kernel ties
    # this to the starting thread: only for a supervisor that starts children from its main thread.
    die_with_parent: bool = False

    def start(
        self, name: str, argv: Sequence[str], *, extra_env: Mapping[str, str] | None = None, **popen: object
    ) -> subprocess.Popen[bytes]:
        env = {**self.env, **(extra_env or {})}
        log = None
        if self.logs is not None and "stdout" not in popen:
            log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed once the child has it
            popen.update(stdout=log, stderr=subprocess.STDOUT)
        if self.die_with_parent:
            popen.setdefault("preexec_fn", _terminate_with_parent)
        try:
            process = subprocess.Popen(list(argv), env=env, start_new_session=True, **popen)  # type: ignore[call-overload]  # the caller's options pass through
        finally:
            if log is not None:
                log.close()  # the child holds its own copy
        self.processes[name] = process
        return process

    def start_service(self, plan: ServicePlan, *, wait_s: float | None = None) -> Client:
        """Start ``plan``'s processes; a client of its API. With ``wait_s``, first wait until the
        API answers and every worker answers a ping (``TimeoutError`` after that long)."""
        for name, (argv, extra_env) in plan.processes().items():
            self.start(name, argv, extra_env=extra_env)
        client = Client(plan.base_url)
        if wait_s is not None:
            deadline = time.monotonic() + wait_s
            client.wait_until_up(wait_s)
            wait_for_workers(load_settings(self.env), plan.worker_names, max(1.0, deadline - time.monotonic()))
        return client

    def tail_logs(self, chars: int = 3000) -> str:
        """The end of each process's log, for a failure's message."""
        if self.logs is None:
            return ""
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}" for path in sorted(self.logs.glob("*.log"))
        )

    def exited(self) -> dict[str, int]:
        return {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}

    def stop(self, timeout_s: float = 20.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
