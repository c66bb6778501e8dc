"""docker/: what can be checked without a Docker engine (none runs here, so no image is built).

The compose files are valid Compose documents once interpolated as compose does; every service runs
a command this suite itself runs (the ones in ``worker/cli/stack.py``), and the health checks of the
API and the workers are run here against the real service; Redis is durable, bounded and
password-protected; Flower has auth and is published on loopback only; each GPU worker reserves its
own GPU; the Dockerfile builds every image from pyproject.toml, torch below the dependencies and the
code on top.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyOptions
from packaging.requirements import Requirement

from tests.conftest import RunningService
from worker.cli.stack import api_command, cpu_worker_command, flower_command, gpu_worker_command

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"
GPU_HOST = ROOT / "docker" / "compose.gpu-host.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SECRETS = {
    "REDIS_PASSWORD": "redis-pw-0123",
    "MINIO_ROOT_PASSWORD": "minio-pw-0123",
    "FLOWER_PASSWORD": "flower-pw-0123",
    "MAIN_HOST": "10.1.2.3",
}
LONG_RUNNING = {"redis", "minio", "api", "cpu-worker", "gpu-worker-0", "flower"}


class MissingVariable(KeyError):
    pass


_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ``${X}``, ``${X:-default}``, ``${X-default}``, ``${X:?error}``,
    ``${X?error}``; ``$$`` is a literal ``$`` left for the container's shell."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if operator == ":-":
            return value or argument
        if operator == "-":
            return argument if value is None else value
        if operator in {":?", "?"} and not value:
            raise MissingVariable(f"{name}: {argument}")
        return value or ""

    return _VARIABLE.sub(substitute, text)


def load(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    text = interpolate(path.read_text(), SECRETS if env is None else env)
    # The Compose specification's own model (strict: an unknown key or a bad duration fails).
    PyOptions(apply_merge=True).from_yaml(text).validate()
    return yaml.safe_load(text)


def container(argv: list[str]) -> list[str]:
    """A stack command as the images run it: ``python`` on the PATH of the image."""
    return ["python" if arg == sys.executable else arg for arg in argv]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE)


def test_compose_files_are_valid_compose_documents(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == LONG_RUNNING | {"minio-init"}
    assert set(load(GPU_HOST)["services"]) == {"gpu-worker-0"}


@pytest.mark.parametrize("variable", ["REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "FLOWER_PASSWORD"])
def test_compose_refuses_to_start_without_each_secret(variable: str) -> None:
    with pytest.raises(MissingVariable, match=variable):
        load(COMPOSE, {k: v for k, v in SECRETS.items() if k != variable})


def test_every_service_runs_a_command_the_test_suite_runs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["api"]["command"] == container(api_command(host="0.0.0.0", port=8000, workers=4))
    assert services["cpu-worker"]["command"] == container(cpu_worker_command(concurrency=2))
    assert services["gpu-worker-0"]["command"] == container(gpu_worker_command("gpu0"))
    assert load(GPU_HOST)["services"]["gpu-worker-0"]["command"] == container(gpu_worker_command("gpu0"))
    assert services["flower"]["command"] == container(flower_command(port=5555, address="0.0.0.0"))
    # The images' default commands are the same ones.
    stages = dockerfile_stages()
    assert stages["api"].cmd == container(api_command(host="0.0.0.0", port=8000, workers=4))
    assert stages["cpu-worker"].cmd == container(cpu_worker_command(concurrency=2))
    assert stages["gpu-worker"].cmd == container(gpu_worker_command("gpu0"))


def test_redis_is_durable_bounded_private_and_password_protected(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    options = dict(zip(redis["command"][1::2], redis["command"][2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--maxmemory"] != "0"
    assert options["--requirepass"] == SECRETS["REDIS_PASSWORD"]
    assert redis["ports"] == ["127.0.0.1:6379:6379"]
    for name in ("api", "cpu-worker", "gpu-worker-0", "flower"):
        url = compose["services"][name]["environment"]["VIDEOQA_REDIS_URL"]
        assert url == f"redis://default:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"


def test_every_long_running_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name in LONG_RUNNING:
        assert compose["services"][name]["healthcheck"]["test"], name
    # The one-shot bucket creation has no health to check: it runs once, and its dependents wait
    # for it to exit successfully.
    init = compose["services"]["minio-init"]
    assert init["restart"] == "no"
    assert init["entrypoint"] == ["mc", "mb", "--ignore-existing", "target/videoqa"]
    assert compose["services"]["api"]["environment"]["VIDEOQA_STORAGE_URL"] == "s3://videoqa/jobs"
    for name in ("api", "cpu-worker", "gpu-worker-0"):
        depends = compose["services"][name]["depends_on"]
        assert depends["minio-init"] == {"condition": "service_completed_successfully"}
        assert depends["redis"] == {"condition": "service_healthy"}


def test_flower_has_auth_and_only_loopback_ports_are_published_by_default(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == f"admin:{SECRETS['FLOWER_PASSWORD']}"
    assert not any("basic" in arg for arg in flower["command"])  # never in argv
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    opened = load(COMPOSE, {**SECRETS, "FLOWER_BIND": "10.0.0.2"})
    assert opened["services"]["flower"]["ports"] == ["10.0.0.2:5555:5555"]


def test_each_gpu_worker_reserves_its_own_gpu(compose: dict[str, Any]) -> None:
    for document in (compose, load(GPU_HOST)):
        workers = {name: s for name, s in document["services"].items() if name.startswith("gpu-worker-")}
        reserved = []
        for name, service in workers.items():
            (device,) = service["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
            (gpu,) = device["device_ids"]
            reserved.append(gpu)
            assert name == f"gpu-worker-{gpu}"
            assert f"gpu{gpu}@%h" in service["command"]
            assert f"gpu{gpu}@$HOSTNAME" in service["healthcheck"]["test"][1]
        assert len(set(reserved)) == len(reserved)


def _run_check(test: list[str], env: dict[str, str]) -> int:
    argv = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
    return subprocess.run(argv, env=env, capture_output=True, timeout=60).returncode


def test_health_checks_pass_against_the_running_service(compose: dict[str, Any], service: RunningService) -> None:
    """The compose health checks, run here against the real API and workers (``python`` and
    ``celery`` from this environment, ``$HOSTNAME`` as the container would set it)."""
    env = {
        **service.env,
        "HOSTNAME": socket.gethostname(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    checks = {name: compose["services"][name]["healthcheck"]["test"] for name in ("api", "cpu-worker", "gpu-worker-0")}
    port = service.base_url.rsplit(":", 1)[1]
    checks["api"] = [part.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for part in checks["api"]]
    assert _run_check(checks["api"], env) == 0
    # As compose's start_period allows, the workers may still be starting: each check passes
    # once its worker consumes (cpu) or has loaded its model (gpu).
    for name in ("cpu-worker", "gpu-worker-0"):
        deadline = time.monotonic() + 120
        while _run_check(checks[name], env) != 0:
            assert time.monotonic() < deadline, (name, service.tail_logs())
            time.sleep(1)
    # The worker checks name their own container: another hostname fails.
    elsewhere = {**env, "HOSTNAME": "another-host"}
    assert _run_check(checks["cpu-worker"], elsewhere) != 0
    assert _run_check(checks["gpu-worker-0"], elsewhere) != 0


# -- Dockerfile ---------------------------------------------------------------------------------


class Stage:
    def __init__(self, name: str, base: str) -> None:
        self.name = name
        self.base = base
        self.instructions: list[tuple[str, str]] = []
        self.cmd: list[str] | None = None


def dockerfile_stages() -> dict[str, Stage]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            current = stages[name.strip()] = Stage(name.strip(), base.strip())
        elif current is not None:
            current.instructions.append((keyword, rest.strip()))
            if keyword == "CMD":
                current.cmd = yaml.safe_load(rest)
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[tuple[str, str]]:
    """The instructions that build a target, from its first ancestor stage down."""
    stage = stages[name]
    earlier = chain(stages, stage.base) if stage.base in stages else []
    return earlier + stage.instructions


def _position(instructions: list[tuple[str, str]], keyword: str, needle: str) -> int:
    return next(i for i, (k, rest) in enumerate(instructions) if k == keyword and needle in rest)


@pytest.mark.parametrize(("target", "extra"), [("api", ""), ("cpu-worker", "[worker]"), ("gpu-worker", "[gpu]")])
def test_each_image_installs_from_pyproject_in_layers(target: str, extra: str) -> None:
    stages = dockerfile_stages()
    steps = chain(stages, target)
    if target == "gpu-worker":  # the runtime stage takes the environment built in gpu-build
        steps = chain(stages, "gpu-build") + steps
    dependencies = _position(steps, "RUN", f'pip install "{"." + extra}"' if extra else "pip install . ")
    pyproject = _position(steps, "COPY", "pyproject.toml ./")
    code = _position(steps, "COPY", "api api")
    assert pyproject < dependencies < code
    assert any(k == "RUN" and "pip install --no-deps ." in rest for k, rest in steps[code:])
    if target == "api":
        assert not any("torch" in rest for _, rest in steps), "the API image has no torch"
    else:
        assert _position(steps, "RUN", "torch==") < pyproject, "torch sits below the dependencies"


def test_dockerfile_pins_agree_with_pyproject_and_the_runtime_image_has_no_compiler() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    arguments = dict(
        line.split(" ", 1)[1].split("=", 1)
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("ARG ") and "=" in line
    )
    flash = next(Requirement(r) for r in project["optional-dependencies"]["gpu"] if r.startswith("flash-attn"))
    assert flash.specifier.contains(arguments["FLASH_ATTN_VERSION"])
    torch = next(Requirement(r) for r in project["optional-dependencies"]["worker"] if r.startswith("torch"))
    assert torch.specifier.contains(arguments["TORCH_VERSION"])
    stages = dockerfile_stages()
    assert stages["gpu-worker"].base == "${CUDA_RUNTIME_IMAGE}" and "nvidia/cuda:" in arguments["CUDA_RUNTIME_IMAGE"]
    assert "devel" not in arguments["CUDA_RUNTIME_IMAGE"]
    assert any(k == "USER" and rest == "videoqa" for k, rest in stages["gpu-worker"].instructions)
    ignored = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ignored[ignored.index("**") :][:1] == ["**"]  # everything is left out but what is listed
