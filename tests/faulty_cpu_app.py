"""The real CPU worker app, dying by SIGKILL at a chosen moment of an ingest task's life: a fault
injected for tests (``celery -A tests.faulty_cpu_app worker``), since no outside signal can land on
such a moment reliably.

``VIDEOQA_TEST_KILL_AT`` names the moment:

- ``task_received``: in the worker's main process, once it has taken the message and recorded it
  as unacknowledged; the whole worker dies (its process group), as when its machine goes away;
- ``task_prerun``: in the pool process that has just accepted the task, before the task runs;
- ``task_postrun``: in the pool process, after the task ran, before its message is acknowledged.

``VIDEOQA_TEST_KILLS`` (default 1) deaths in all; ``KILLS_KEY`` in Redis counts the moments
reached, across the processes that replace the dead ones. ``VIDEOQA_TEST_SLOW_START_S`` makes
each pool process that long to start, as on a loaded machine.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from celery import signals

from common.celery_config import INGEST_TASK
from worker.app.factory import build_worker_app
from worker.app.resources import resources_of

KILLS_KEY = "videoqa:test:kill-moments"

app = build_worker_app("cpu")


def _maybe_die(moment: str, task_name: str) -> None:
    if os.environ.get("VIDEOQA_TEST_KILL_AT") != moment or task_name != INGEST_TASK:
        return
    reached = resources_of(app).jobs.client.incr(KILLS_KEY)
    if reached > int(os.environ.get("VIDEOQA_TEST_KILLS", "1")):
        return
    if moment == "task_received":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _on_received(request: Any = None, **_: Any) -> None:
    _maybe_die("task_received", getattr(request, "name", ""))


def _on_prerun(task: Any = None, **_: Any) -> None:
    _maybe_die("task_prerun", getattr(task, "name", ""))


def _on_postrun(task: Any = None, **_: Any) -> None:
    _maybe_die("task_postrun", getattr(task, "name", ""))


def _slow_start(**_: Any) -> None:
    time.sleep(float(os.environ.get("VIDEOQA_TEST_SLOW_START_S", "0")))


signals.worker_process_init.connect(_slow_start, weak=False)
signals.task_received.connect(_on_received, weak=False)
signals.task_prerun.connect(_on_prerun, weak=False)
signals.task_postrun.connect(_on_postrun, weak=False)
