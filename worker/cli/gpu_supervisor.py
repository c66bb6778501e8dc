"""``videoqa gpu-workers``: one GPU worker per GPU on this host, each pinned with
``CUDA_VISIBLE_DEVICES`` and named after its GPU, restarted when it dies.

A worker that exits with EX_CONFIG (its model cannot load) is not restarted: it would fail the
same way again. Others are restarted after a pause that doubles with each quick death (up to a
minute) and resets once a worker has lived a minute. On a host without CUDA one worker runs on
the CPU, named ``gpu-cpu``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from worker.cli.stack import Stack, gpu_worker_command
from worker.gpu.lifecycle import EX_CONFIG

log = logging.getLogger(__name__)

CPU_WORKER = "gpu-cpu"
MAX_PAUSE_S = 60.0
HEALTHY_AFTER_S = 60.0


@dataclass(frozen=True)
class WorkerPlan:
    name: str  # the hostname's node part: gpu0, gpu2, gpu-cpu
    env: dict[str, str]


def visible_gpus(environ: Mapping[str, str]) -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (indices or UUIDs)."""
    import torch

    count = torch.cuda.device_count()  # NVML-based: does not initialise CUDA in this process
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        entries = [entry.strip() for entry in listed.split(",") if entry.strip()]
        return entries[:count]
    return [str(index) for index in range(count)]


def plan_workers(requested: Sequence[int] | None, visible: Sequence[str]) -> list[WorkerPlan]:
    """One worker per requested GPU index (all visible ones by default), or one CPU worker.

    Indices count the visible GPUs, as CUDA numbers them in this environment; each worker sees
    only its own GPU, as its device 0."""
    if not visible:
        if requested:
            raise ValueError("no CUDA device is visible, so --gpus cannot be honoured")
        return [WorkerPlan(CPU_WORKER, {"CUDA_VISIBLE_DEVICES": "", "VIDEOQA_DEVICE": "cpu"})]
    indices = list(range(len(visible))) if not requested else list(dict.fromkeys(requested))
    unknown = [index for index in indices if not 0 <= index < len(visible)]
    if unknown:
        raise ValueError(f"GPU {unknown[0]} is not visible here (visible: 0..{len(visible) - 1})")
    return [WorkerPlan(f"gpu{index}", {"CUDA_VISIBLE_DEVICES": visible[index]}) for index in indices]


@dataclass
class _Slot:
    plan: WorkerPlan
    started_at: float = 0.0
    pause_s: float = 0.5
    restart_at: float | None = None
    given_up: bool = False


class Supervisor:
    """Starts the planned workers and keeps them running until ``stop``."""

    def __init__(
        self,
        plans: Sequence[WorkerPlan],
        env: Mapping[str, str],
        *,
        say: Callable[[str], None] = print,
    ) -> None:
        self.stack = Stack(env=dict(env))
        self.slots = {plan.name: _Slot(plan) for plan in plans}
        self.say = say
        self.stopping = False

    def _start(self, slot: _Slot) -> None:
        process = self.stack.start(slot.plan.name, gpu_worker_command(slot.plan.name), extra_env=slot.plan.env)
        slot.started_at = time.monotonic()
        slot.restart_at = None
        pinned = slot.plan.env.get("CUDA_VISIBLE_DEVICES") or "none"
        self.say(f"{slot.plan.name}: started (pid {process.pid}, CUDA_VISIBLE_DEVICES={pinned})")

    def start(self) -> None:
        for slot in self.slots.values():
            self._start(slot)

    def tick(self) -> bool:
        """Restart what died; False once no worker is left to run."""
        now = time.monotonic()
        for name, slot in self.slots.items():
            if slot.given_up:
                continue
            if slot.restart_at is not None:
                if now >= slot.restart_at:
                    self._start(slot)
                continue
            code = self.stack.processes[name].poll()
            if code is None:
                continue
            if code == EX_CONFIG:
                slot.given_up = True
                self.say(f"{name}: its model cannot be loaded (see its log); not restarted")
                continue
            lived = now - slot.started_at
            slot.pause_s = 1.0 if lived >= HEALTHY_AFTER_S else min(MAX_PAUSE_S, slot.pause_s * 2)
            slot.restart_at = now + slot.pause_s
            self.say(f"{name}: exited with {code} after {lived:.0f} s; restarting in {slot.pause_s:.0f} s")
        return any(not slot.given_up for slot in self.slots.values())

    def run(self, poll_s: float = 0.5) -> int:
        """Until SIGTERM/SIGINT (0) or until every worker was given up (1)."""
        self.start()
        try:
            while not self.stopping:
                if not self.tick():
                    self.say("no GPU worker left to run")
                    return 1
                time.sleep(poll_s)
            return 0
        finally:
            self.stop()

    def stop(self) -> None:
        self.stopping = True
        # SIGTERM is a warm shutdown: a batch in progress finishes and is acknowledged first.
        self.stack.stop(timeout_s=120.0)


def run_gpu_workers(requested: Sequence[int] | None, *, say: Callable[[str], None] = print) -> int:
    environ = dict(os.environ)
    plans = plan_workers(requested, visible_gpus(environ))
    if plans[0].name == CPU_WORKER:
        say("no CUDA device visible: starting one worker on the CPU (gpu-cpu)")
    supervisor = Supervisor(plans, environ, say=say)

    def _stop(*_: object) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return supervisor.run()
