"""Builds the worker-side Celery app: the shared configuration plus the tasks and the process's resources."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init

from common.celery_config import make_celery
from common.settings import load_settings
from worker.app.logs import configure_logging
from worker.app.resources import WorkerResources, attach_resources
from worker.app.steps import ModelSetup, ReconcilerStep, SweeperStep
from worker.app.tasks import register_tasks
from worker.media.decode import MEDIA_SANDBOX
from worker.sandbox import confinement
from worker.sandbox import runner as sandbox

log = logging.getLogger(__name__)


def build_worker_app(role: str) -> Celery:
    """``role`` is ``cpu`` or ``gpu``: a GPU worker loads its model before taking jobs."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    app = make_celery(settings)
    resources = WorkerResources(settings, app)
    attach_resources(app, resources)
    register_tasks(app, resources)

    if role == "gpu":
        # One process per GPU holds the model and runs its batches itself (solo pool), after a
        # blueprint step has loaded and warmed it up, before the consumer starts.
        app.conf.worker_pool = "solo"
        app.steps["worker"].add(ModelSetup)
    else:
        # Decode children run as this user: the worker's secrets in /proc stay out of their
        # reach (each prefork child inherits this; each also protects itself in worker.sandbox.runner).
        confinement.protect_caller()

        def _load_geometry(**signal_args: Any) -> None:
            # In the main process, before the pool forks: every child, the ones replacing dead
            # children included, inherits the geometry and starts in about a second, well within
            # the pool's start timeout even on a loaded machine (reading it is many seconds there).
            try:
                _ = resources.geometry  # read now so the forked children inherit it
            except Exception:  # each child tries again; its jobs fail if it cannot either
                log.exception("could not read the image geometry of %s", settings.model)

        def _prepare(**signal_args: Any) -> None:
            # Runs in each prefork child, never at import, so the first job does not pay for
            # starting the decode sandbox (nor for the geometry, when the main process failed).
            _ = resources.geometry  # read now, not on the first job
            sandbox.warm_up(MEDIA_SANDBOX)

        worker_init.connect(_load_geometry, weak=False)
        worker_process_init.connect(_prepare, weak=False)
        app.steps["worker"].add(ReconcilerStep)
        app.steps["worker"].add(SweeperStep)
    return app
