"""Real services for the tests: Redis (a database of our own), moto's S3 server over HTTP,
the tiny model, and the service's own processes started with the README's commands.

Each test is either ``unit`` (in this process only: no Redis, no S3 server, no child process but
the code checkers) or ``service`` (real processes). A test that uses a fixture reaching a server is
``service`` by that alone; one that starts processes itself says so with ``pytest.mark.service``;
every other test is ``unit``, and fails if it starts a process after all."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from common.client import Client, WaitTimedOut
from common.settings import Settings, load_settings
from worker.cli.stack import ServicePlan, Stack, free_port, offline_cpu_env, wait_for_http

REDIS_HOST = os.environ.get("VIDEOQA_TEST_REDIS_HOST", "127.0.0.1:6379")
REDIS_DB = int(os.environ.get("VIDEOQA_TEST_REDIS_DB", "13"))
SPARE_REDIS_DB = REDIS_DB - 1
BUCKET = "videoqa-test"
# The key the service signs webhooks with; receivers in the tests verify with it.
WEBHOOK_SECRET = "whsec_" + "dGVzdHMtb25seSB3ZWJob29rIHNpZ25pbmcga2V5IQ=="


# Fixtures that reach a server outside the test process; `service` and `local_settings` reach them too.
SERVER_FIXTURES = frozenset({"redis_url", "spare_redis_url", "s3_endpoint"})
# The static checkers of the code: they read files and exit, and a unit test may run them.
CHECKERS = frozenset({"ruff", "mypy", "lint-imports"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        kinds = {mark.name for mark in item.iter_markers() if mark.name in ("unit", "service")}
        servers = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if "unit" in kinds and (servers or "service" in kinds):
            raise pytest.UsageError(f"{item.nodeid} is marked unit but needs {sorted(servers) or 'service'}")
        if not kinds:
            item.add_marker(pytest.mark.service if servers else pytest.mark.unit)
        if item.get_closest_marker("gpu") and not _cuda():
            item.add_marker(no_cuda)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit test that starts a process (other than a code checker) fails, naming the fix."""
    if request.node.get_closest_marker("unit") is not None:
        monkeypatch.setattr(subprocess, "Popen", _CheckersOnlyPopen)


class _CheckersOnlyPopen(subprocess.Popen[Any]):
    def __init__(self, args: Any, *more: Any, **options: Any) -> None:
        program = args if isinstance(args, str | os.PathLike) else args[0]
        if Path(program).name not in CHECKERS:
            raise AssertionError(f"a unit test started {program!r}: mark the test pytest.mark.service")
        super().__init__(args, *more, **options)


def _flushed(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.exit(f"the tests need Redis at {REDIS_HOST} (.ci/run starts one)", returncode=2)
    client.flushdb()
    return client


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = f"redis://{REDIS_HOST}/{REDIS_DB}"
    client = _flushed(url)
    yield url
    client.flushdb()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's standalone server: boto3 talks to it over HTTP exactly as to MinIO or AWS."""
    port = free_port()
    with open(tmp_path_factory.mktemp("moto") / "moto.log", "wb") as log:  # the server keeps its own copy
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(f"{endpoint}/moto-api/", timeout_s=120)
    yield endpoint
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def aws_env(s3_endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="session")
def monkeypatch_session() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="session")
def s3(aws_env: dict[str, str], monkeypatch_session: pytest.MonkeyPatch):
    """A boto3 client of the test process, configured by the same variables the service gets."""
    for name, value in aws_env.items():
        monkeypatch_session.setenv(name, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.fixtures.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from worker.fixtures.synthetic_videos import write_sample_videos

    return write_sample_videos(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def direct_model(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The tiny model and its processor loaded in the test process: answers to compare the service's with."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    processor = LlavaProcessor.from_pretrained(tiny_model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval(), processor


def service_env(redis_url: str, aws_env: dict[str, str], model_dir: Path, **extra: str) -> dict[str, str]:
    settings = {
        **aws_env,
        "VIDEOQA_REDIS_URL": redis_url,
        "VIDEOQA_STORAGE_URL": f"s3://{BUCKET}/service",
        "VIDEOQA_MODEL": str(model_dir),
        # The tests' own media servers listen on loopback, which the service refuses by default.
        "VIDEOQA_FETCH_ALLOWLIST": "127.0.0.1",
        "VIDEOQA_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "VIDEOQA_WEBHOOK_BACKOFF_S": "0.5",
    }
    return offline_cpu_env(os.environ, **{**settings, **extra})


class RunningService:
    def __init__(self, base_url: str, env: dict[str, str], stack: Stack, logs: Path) -> None:
        self.base_url = base_url
        self.env = env
        self.stack = stack
        self.logs = logs
        self.settings: Settings = load_settings(env)
        self.client = Client(base_url)

    def url(self, path: str) -> str:
        return self.base_url + path

    def upload(self, video: Path, **fields: str) -> str:
        """Submit ``video`` as a multipart upload with flat text ``fields``; the new job's id."""
        return self.client.submit_fields([video], **fields).id

    def wait(self, job_id: str, timeout_s: float = 120.0) -> dict:
        try:
            return self.client.wait(job_id, timeout_s, poll_interval=0.1).raw
        except WaitTimedOut as exc:
            raise AssertionError(f"job {job_id} did not finish: {exc.job.raw}\n{self.tail_logs()}") from None

    def tail_logs(self) -> str:
        return self.stack.tail_logs()


def start_service(env: dict[str, str], logs: Path) -> RunningService:
    """The API (two gunicorn processes), one CPU worker and one GPU worker (``gpu0``), logging
    under ``logs``."""
    stack = Stack(env=env, logs=logs)
    plan = ServicePlan(port=free_port(), cpu_concurrency=1)
    stack.start_service(plan)
    return RunningService(plan.base_url, env, stack, logs)


@pytest.fixture(scope="session")
def service(
    redis_url: str, aws_env: dict[str, str], s3: object, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    """The API under gunicorn, a CPU worker and a GPU worker, as README starts them."""
    running = start_service(service_env(redis_url, aws_env, tiny_model_dir), tmp_path_factory.mktemp("service-logs"))
    try:
        running.client.wait_until_up(120)
        yield running
    finally:
        running.stack.stop()


@pytest.fixture()
def spare_redis_url() -> Iterator[str]:
    """A second database for tests that must not feed the shared service's workers."""
    url = f"redis://{REDIS_HOST}/{SPARE_REDIS_DB}"
    client = _flushed(url)
    yield url
    client.flushdb()


@pytest.fixture()
def local_settings(spare_redis_url: str, tmp_path: Path) -> Settings:
    return load_settings({"VIDEOQA_REDIS_URL": spare_redis_url, "VIDEOQA_STORAGE_URL": str(tmp_path / "store")})
