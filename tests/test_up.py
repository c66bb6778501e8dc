"""``videoqa up`` as a newcomer runs it: a model that cannot be reached stops it at once with the
fix, ``--tiny`` runs the whole stack on the tiny model, and CPU workers never ask the hub."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import requests
from PIL import Image

from common.job_status import TERMINAL
from tests.conftest import RunningService
from worker.cli.stack import ServicePlan, Stack, free_port, offline_cpu_env

# `videoqa up` and its checks run as commands.
pytestmark = pytest.mark.service

VIDEOQA = str(Path(sys.executable).with_name("videoqa"))
HUB_MODEL = "llava-hf/llava-interleave-qwen-7b-hf"


def _lines(stream: Iterable[str]) -> queue.Queue[str]:
    found: queue.Queue[str] = queue.Queue()

    def _read() -> None:
        for line in stream:
            found.put(line)

    threading.Thread(target=_read, daemon=True).start()
    return found


def _until(lines: queue.Queue[str], seen: list[str], needle: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} within {timeout_s:.0f} s:\n{''.join(seen)[-6000:]}")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # An exited child not yet reaped by init is gone for our purpose.
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_the_processes_up_started_stop_when_up_is_killed_outright(
    spare_redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / ".cache" / "videoqa"
    cache.mkdir(parents=True)
    (cache / "tiny-model").symlink_to(tiny_model_dir)
    env = offline_cpu_env(
        os.environ,
        HOME=str(tmp_path),
        VIDEOQA_REDIS_URL=spare_redis_url,
        VIDEOQA_STORAGE_URL=str(tmp_path / "store"),
        VIDEOQA_LOG_FORMAT="console",
    )
    port = free_port()
    process = subprocess.Popen(
        [VIDEOQA, "up", "--tiny", "--port", str(port), "--api-workers", "1", "--cpu-concurrency", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    children: list[int] = []
    try:
        _until(_lines(process.stdout), [], "starting the API", timeout_s=120)
        deadline = time.monotonic() + 60
        while len(children) < 3 and time.monotonic() < deadline:
            with open(f"/proc/{process.pid}/task/{process.pid}/children") as listed:
                children = [int(pid) for pid in listed.read().split()]
            time.sleep(0.2)
        assert len(children) == 3, children  # the API, a CPU worker and a GPU worker
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 90
        while (alive := [pid for pid in children if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert alive == [], f"still running after `up` was killed: {alive}"
    finally:
        if process.poll() is None:
            process.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize("where", ["missing-folder", "hub-id-offline"])
def test_up_without_a_reachable_model_stops_at_once_naming_the_fix(where: str, tmp_path: Path) -> None:
    env = offline_cpu_env(os.environ, VIDEOQA_REDIS_URL="redis://127.0.0.1:1/0", HOME=str(tmp_path))
    if where == "missing-folder":
        env["VIDEOQA_MODEL"] = str(tmp_path / "no-such-model")
    else:
        env.update({"VIDEOQA_MODEL": HUB_MODEL, "HF_HOME": str(tmp_path / "empty-hf-home")})
    completed = subprocess.run(
        [VIDEOQA, "up", "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode != 0
    (line,) = [text for text in completed.stderr.splitlines() if text.strip()]
    assert "VIDEOQA_MODEL" in line and "videoqa tiny-model" in line and "videoqa up --tiny" in line
    assert "ready" not in completed.stdout


def test_up_tiny_gets_ready_answers_a_job_and_stops_on_ctrl_c(
    spare_redis_url: str, tiny_model_dir: Path, sample_videos: list[Path], tmp_path: Path
) -> None:
    # `--tiny` reuses the model already built in its cache folder (here the session's tiny model).
    cache = tmp_path / ".cache" / "videoqa"
    cache.mkdir(parents=True)
    (cache / "tiny-model").symlink_to(tiny_model_dir)
    port = free_port()
    env = offline_cpu_env(
        os.environ,
        HOME=str(tmp_path),
        VIDEOQA_REDIS_URL=spare_redis_url,
        VIDEOQA_STORAGE_URL=str(tmp_path / "store"),
        VIDEOQA_LOG_FORMAT="console",
    )
    # Started with SIGINT ignored, as a shell starts a background command: Ctrl-C still stops it.
    process = subprocess.Popen(
        [VIDEOQA, "up", "--tiny", "--port", str(port), "--api-workers", "1", "--cpu-concurrency", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_ignore_sigint,
    )  # fmt: skip
    seen: list[str] = []
    try:
        lines = _lines(process.stdout)
        ready = _until(lines, seen, "videoqa is ready", timeout_s=240)
        base = f"http://127.0.0.1:{port}"
        assert f"{base}/v1/jobs" in ready
        assert requests.get(f"{base}/readyz", timeout=10).status_code == 200
        with open(sample_videos[0], "rb") as handle:
            response = requests.post(
                f"{base}/v1/jobs",
                files=[("videos", ("cat.mp4", handle, "video/mp4"))],
                data={"question": "What is the cat doing?", "num_frames": "2", "max_new_tokens": "4"},
                timeout=30,
            )
        assert response.status_code == 202, response.text
        job_url = base + response.headers["Location"]
        deadline = time.monotonic() + 180
        while (job := requests.get(job_url, timeout=10).json())["status"] not in TERMINAL:
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["status"] == "succeeded", (job["error"], "".join(seen)[-4000:])
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        time.sleep(0.5)
        while not lines.empty():
            seen.append(lines.get())
        output = "".join(seen)
        assert "stopping" in output
        # Console lines from the API and the workers, not JSON.
        worker_lines = [line for line in output.splitlines() if " INFO " in line]
        assert worker_lines and not any(line.lstrip().startswith("{") for line in output.splitlines())
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{base}/healthz", timeout=5)
    finally:
        if process.poll() is None:
            # Ctrl-C, so that `up` stops the processes it started; they outlive a killed `up`.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_a_cpu_worker_for_a_hub_model_ingests_without_asking_the_hub(
    spare_redis_url: str, sample_videos: list[Path], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    env = offline_cpu_env(
        os.environ,
        VIDEOQA_REDIS_URL=spare_redis_url,
        VIDEOQA_STORAGE_URL=str(store),
        VIDEOQA_MODEL=HUB_MODEL,
        VIDEOQA_LOG_LEVEL="DEBUG",
        HF_HOME=str(tmp_path / "empty-hf-home"),
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    stack = Stack(env=env, logs=logs)
    plan = ServicePlan(port=free_port(), api_workers=1, cpu_concurrency=1, gpu_workers=0)
    service = RunningService(plan.base_url, env, stack, logs)
    try:
        stack.start_service(plan)
        service.client.wait_until_up(60)
        job_id = service.upload(sample_videos[0], question="What is the cat doing?", num_frames="2")
        deadline = time.monotonic() + 180
        while (job := requests.get(service.url(f"/v1/jobs/{job_id}"), timeout=10).json())["status"] != "queued_gpu":
            assert job["status"] in {"queued", "ingesting"} and time.monotonic() < deadline, (job, service.tail_logs())
            time.sleep(0.2)
        # Frames sized from VIDEOQA_IMAGE_SIZE's default, the served model's 384 x 384.
        frames = sorted(store.rglob("frames/**/*.png"))
        assert len(frames) == 2
        assert all(Image.open(path).size == (384, 384) for path in frames)
    finally:
        stack.stop()
    log = (logs / "cpu.log").read_text(errors="replace")
    # HF_HUB_OFFLINE makes any hub request raise, and DEBUG shows every request made.
    for trace in ("huggingface.co", "OfflineModeIsEnabled", "huggingface_hub", "Traceback"):
        assert trace not in log, log[-4000:]


def test_a_hub_model_in_the_cache_passes_the_check_offline(tmp_path: Path) -> None:
    # The hub cache's own layout, as huggingface_hub writes it; only config.json is looked for.
    repo = tmp_path / "hf" / "hub" / "models--owner--cached-model"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    check = (
        "from worker.cli.model_check import model_problem as p; print(p('owner/cached-model')); print(p('owner/other'))"
    )
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=60)
    cached, other = out.stdout.splitlines()
    assert cached == "None", out.stderr
    assert "owner/other is not in the hub cache (HF_HOME) and HF_HUB_OFFLINE is set" in other
