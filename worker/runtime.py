"""What a worker process holds: settings, clients, and on GPU workers the loaded model.

Clients are created lazily, in the process that uses them: prefork children must not inherit
sockets opened by their parent.
"""

from __future__ import annotations

import logging
from functools import cached_property

from celery import Celery

from common.celery_config import GENERATE_TASK
from common.connections import redis_client
from common.jobs import JobStore
from common.settings import Settings
from common.storage import ObjectStore, open_store
from worker.generate import GenerateContext
from worker.geometry import FrameGeometry, load_geometry
from worker.inference import LoadedModel, load_model
from worker.ingest import IngestContext

log = logging.getLogger(__name__)


class WorkerRuntime:
    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings = settings
        self.celery = celery
        self.model: LoadedModel | None = None

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(redis_client(self.settings), ttl_s=self.settings.job_ttl_s)

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.settings)

    @cached_property
    def geometry(self) -> FrameGeometry:
        return load_geometry(self.settings.model)

    def load_model(self) -> LoadedModel:
        if self.model is None:
            self.model = load_model(self.settings)
        return self.model

    def ingest_context(self) -> IngestContext:
        return IngestContext(
            settings=self.settings,
            jobs=self.jobs,
            store=self.store,
            geometry=lambda: self.geometry,
            enqueue_generate=lambda job_id: self.celery.send_task(GENERATE_TASK, args=[job_id]),
        )

    def generate_context(self) -> GenerateContext:
        return GenerateContext(jobs=self.jobs, store=self.store, model=self.load_model())
