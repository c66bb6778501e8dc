"""``videoqa gpu-workers``: which workers it plans for which GPUs, and the real supervisor on this
CPU-only machine (one CPU worker, restarted when killed, withdrawn when stopped)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import readiness
from common.connections import redis_client
from common.settings import load_settings
from tests.conftest import service_env
from worker.cli.gpu_supervisor import CPU_WORKER, WorkerPlan, plan_workers


def test_one_pinned_worker_per_gpu_named_after_it() -> None:
    assert plan_workers(None, ["0", "1"]) == [
        WorkerPlan("gpu0", {"CUDA_VISIBLE_DEVICES": "0"}),
        WorkerPlan("gpu1", {"CUDA_VISIBLE_DEVICES": "1"}),
    ]
    # --gpus counts the GPUs visible here; a restricted CUDA_VISIBLE_DEVICES is honoured.
    assert plan_workers([0, 2], ["4", "5", "6", "7"]) == [
        WorkerPlan("gpu0", {"CUDA_VISIBLE_DEVICES": "4"}),
        WorkerPlan("gpu2", {"CUDA_VISIBLE_DEVICES": "6"}),
    ]
    assert plan_workers(None, []) == [WorkerPlan(CPU_WORKER, {"CUDA_VISIBLE_DEVICES": "", "VIDEOQA_DEVICE": "cpu"})]
    with pytest.raises(ValueError, match="GPU 3 is not visible"):
        plan_workers([3], ["0", "1"])
    with pytest.raises(ValueError, match="no CUDA device"):
        plan_workers([0], [])


def _ready_pid(client, hostname: str, *, other_than: int | None, process: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for worker in readiness.ready_workers(client):
            if worker.hostname == hostname and worker.pid != other_than:
                return worker.pid
        assert process.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{hostname} never became ready")


def test_without_cuda_one_cpu_worker_runs_and_is_restarted_when_it_dies(
    spare_redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = service_env(
        spare_redis_url,
        {},
        tiny_model_dir,
        VIDEOQA_STORAGE_URL=str(tmp_path / "store"),
        VIDEOQA_HEARTBEAT_INTERVAL_S="1",
    )
    client = redis_client(load_settings(env))
    hostname = f"{CPU_WORKER}@{os.uname().nodename}"
    videoqa = Path(sys.executable).with_name("videoqa")
    log = tmp_path / "gpu-workers.log"
    with open(log, "wb") as handle:
        supervisor = subprocess.Popen(
            [str(videoqa), "gpu-workers"], env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        first = _ready_pid(client, hostname, other_than=None, process=supervisor, log=log)
        os.kill(first, signal.SIGKILL)
        second = _ready_pid(client, hostname, other_than=first, process=supervisor, log=log)
        assert second != first
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=60)
    finally:
        if supervisor.poll() is None:  # the test failed: still stop the workers it supervises
            supervisor.send_signal(signal.SIGTERM)
            supervisor.wait(timeout=60)
    output = log.read_text()
    assert supervisor.returncode == 0, output
    assert "no CUDA device visible: starting one worker on the CPU (gpu-cpu)" in output
    assert f"{CPU_WORKER}: exited with -9" in output
    assert output.count(f"{CPU_WORKER}: started") == 2
    assert readiness.ready_workers(client) == []
