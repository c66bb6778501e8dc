"""What the routes use, built once per process by the app factory and attached to the app."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis
from celery import Celery
from flask import Flask, current_app
from prometheus_client import CollectorRegistry

from api.idempotency import IdempotencyKeys
from common.celery_config import GENERATE_TASK, INGEST_TASK, VIDEO_TASK
from common.jobs import JobStore
from common.settings import Settings
from common.storage import ObjectStore
from common.videos import VideoStore

_EXTENSION = "videoqa"


@dataclass
class Services:
    settings: Settings
    jobs: JobStore
    store: ObjectStore
    celery: Celery
    redis: redis.Redis
    metrics: CollectorRegistry
    idempotency: IdempotencyKeys
    videos: VideoStore

    @property
    def enqueue_ingest(self) -> Callable[[str], None]:
        return lambda job_id: self.celery.send_task(INGEST_TASK, args=[job_id])

    @property
    def enqueue_generate(self) -> Callable[[str], None]:
        """For jobs whose media are all stored already: they skip the CPU stage."""
        return lambda job_id: self.celery.send_task(GENERATE_TASK, args=[job_id])

    @property
    def enqueue_video(self) -> Callable[[str], None]:
        return lambda video_id: self.celery.send_task(VIDEO_TASK, args=[video_id])

    def attach(self, app: Flask) -> None:
        app.extensions[_EXTENSION] = self


def current_services() -> Services:
    """The services of the app handling the current request."""
    found: Services = current_app.extensions[_EXTENSION]
    return found
