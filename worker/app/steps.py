"""Steps of the Celery worker's blueprint: the GPU worker's model set-up, and the CPU workers'
timers (reconciler and sweeper). Each finds the process's resources with ``resources_of``."""

from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar

import redis
from celery import bootsteps

from common.errors import VideoQAError
from common.storage import ObjectStore, open_store
from worker.app.reconciler import reconcile
from worker.app.resources import resources_of
from worker.app.video_reconciler import reconcile_videos
from worker.cpu.sweeper import sweep
from worker.gpu.lifecycle import EX_CONFIG, Heartbeat

log = logging.getLogger(__name__)


class ModelSetup(bootsteps.StartStopStep):
    """Load and warm up the model, then publish readiness; withdraw it when the worker stops.

    Celery starts it after the pool and before the consumer, so the model is loaded (once, in the
    process that runs the tasks: the GPU worker uses the solo pool) before any message is taken.
    """

    label = "videoqa-model"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.obj: Heartbeat | None = None

    def start(self, parent: Any) -> None:
        from worker.gpu.model import ModelLoadError

        resources = resources_of(parent.app)
        try:
            resources.prepare_gpu(parent.hostname)
        except ModelLoadError as exc:
            log.critical("%s; this worker stops", exc)
            raise SystemExit(EX_CONFIG) from None
        self.obj = Heartbeat(
            resources.readiness_client, resources.describe_readiness, resources.settings.heartbeat_interval_s
        )
        self.obj.start()
        log.info("%s is ready: batches of up to %d jobs", parent.hostname, resources.batch_size)


class ReconcilerStep(bootsteps.StartStopStep):
    """Runs ``reconcile`` on the worker's timer (CPU workers only)."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._timer_ref: Any = None

    def start(self, worker: Any) -> None:
        resources = resources_of(worker.app)
        settings = resources.settings

        def scan() -> None:
            try:
                reconcile(
                    resources.jobs.client,
                    resources.jobs,
                    lambda task, job_id: worker.app.send_task(task, args=[job_id]),
                    stale_after_s=settings.reconcile_after_s,
                )
                reconcile_videos(
                    resources.jobs.client,
                    resources.videos,
                    lambda task, video_id: worker.app.send_task(task, args=[video_id]),
                    stale_after_s=settings.reconcile_after_s,
                )
            except redis.RedisError as exc:
                log.warning("reconciler: Redis unavailable (%s); next scan later", exc.__class__.__name__)

        self._timer_ref = worker.timer.call_repeatedly(settings.reconcile_interval_s, scan, priority=10)

    def stop(self, worker: Any) -> None:
        if self._timer_ref is not None:
            self._timer_ref.cancel()


class SweeperStep(bootsteps.StartStopStep):
    """Runs ``sweep`` on the worker's timer (CPU workers only), in a thread of its own: listing a
    large bucket must not hold up the worker's event loop."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._timer_ref: Any = None
        self._running: threading.Thread | None = None
        self._store: ObjectStore | None = None

    def start(self, worker: Any) -> None:
        resources = resources_of(worker.app)
        settings = resources.settings

        def run() -> None:
            try:
                if self._store is None:
                    # A store of its own: pool processes forked later inherit the resources' and
                    # use it; they must not share its connections with this thread.
                    self._store = open_store(settings)
                outcome = sweep(
                    resources.jobs.client,
                    resources.jobs,
                    self._store,
                    retention_s=settings.storage_retention_s,
                    job_ttl_s=settings.job_ttl_s,
                    lock_s=settings.sweep_interval_s,
                )
            except (redis.RedisError, VideoQAError) as exc:
                log.warning("sweeper: %s; next sweep later", exc.__class__.__name__)
                return
            except Exception:
                # A thread's exception would go to stderr only; the next sweep tries again.
                log.exception("sweeper failed; next sweep later")
                return
            if outcome is not None and (outcome.deleted or outcome.index_entries_removed):
                log.info(
                    "sweeper: deleted %d stored objects and %d index entries",
                    outcome.deleted,
                    outcome.index_entries_removed,
                )

        def start_sweep() -> None:
            if self._running is None or not self._running.is_alive():
                self._running = threading.Thread(target=run, name="videoqa-sweeper", daemon=True)
                self._running.start()

        self._timer_ref = worker.timer.call_repeatedly(settings.sweep_interval_s, start_sweep, priority=10)

    def stop(self, worker: Any) -> None:
        if self._timer_ref is not None:
            self._timer_ref.cancel()
