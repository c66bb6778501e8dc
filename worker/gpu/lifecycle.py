"""A GPU worker's readiness: what it publishes once its model is loaded, and the heartbeat that
keeps it fresh.

The model is loaded and warmed up by a step of the Celery worker's blueprint
(``worker.app.steps.ModelSetup``) before the worker takes any message. A model that cannot load
stops the worker with exit status 78 (EX_CONFIG) and one clear log line, instead of a worker that
fails every job; ``videoqa gpu-workers`` does not restart a worker that exits so.

Readiness is a Redis key (``common.readiness``) refreshed by a thread every heartbeat interval,
and deleted when the worker stops.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from common import readiness
from common.readiness import WorkerReadiness

if TYPE_CHECKING:
    from worker.gpu.model import LoadedModel

log = logging.getLogger(__name__)

EX_CONFIG = 78  # sysexits.h: "configuration error"; the supervisor does not restart on it


class Heartbeat:
    """Publishes ``describe()`` now and then every ``interval_s`` until stopped; then withdraws."""

    def __init__(self, client: redis.Redis, describe: Callable[[], WorkerReadiness], interval_s: float) -> None:
        self.client = client
        self.describe = describe
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="readiness-heartbeat", daemon=True)
        self.hostname = ""

    def start(self) -> None:
        self._beat()  # ready as soon as this returns, not one interval later
        self.thread.start()

    def _beat(self) -> None:
        current = self.describe()
        self.hostname = current.hostname
        readiness.publish(self.client, current, interval_s=self.interval_s)

    def _run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                self._beat()
            except Exception:
                log.warning("readiness heartbeat failed", exc_info=True)

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=self.interval_s + 5)
        try:
            readiness.withdraw(self.client, self.hostname, pid=os.getpid())
        except redis.RedisError:
            log.warning("could not withdraw readiness of %s; it expires by itself", self.hostname)


def describe(
    loaded: LoadedModel, *, hostname: str, batch_size: int, batch_wait_ms: int, ready_since: float
) -> WorkerReadiness:
    """The readiness record of a loaded worker, with its current free memory."""
    from worker.gpu.model import memory_info

    free, total = memory_info(loaded)
    gpu = None
    if loaded.device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(0)
    return WorkerReadiness(
        hostname=hostname,
        model=loaded.model_id,
        revision=loaded.revision,
        device="cuda:0" if loaded.device.startswith("cuda") else loaded.device,
        gpu=gpu,
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        dtype=loaded.dtype,
        attn_implementation=loaded.attn_implementation,
        free_memory_bytes=free,
        total_memory_bytes=total,
        batch_size=batch_size,
        batch_wait_ms=batch_wait_ms,
        pid=os.getpid(),
        ready_since=ready_since,
        updated_at=time.time(),
    )
