"""The Celery application shared by the API (which only sends) and the workers (which also run).

Task names are constants so the API can enqueue by name without importing worker code.
"""

from __future__ import annotations

import math

from celery import Celery
from kombu import Queue

from common.settings import Settings

INGEST_TASK = "videoqa.ingest"
GENERATE_TASK = "videoqa.generate"
# Samples and stores the frames of a stored video (POST /v1/videos).
VIDEO_TASK = "videoqa.ingest_video"
# Runs on CPU workers: a GPU worker only sends it when a job ends, never waits on a delivery.
WEBHOOK_TASK = "videoqa.webhook"
CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"


def make_celery(settings: Settings, *, main: str = "videoqa") -> Celery:
    app = Celery(main, broker=settings.redis_url, set_as_current=False)
    restore_interval = max(1.0, min(10.0, settings.visibility_timeout_s / 4))
    soft_limit = max(settings.task_time_limit_s - 30, int(settings.task_time_limit_s * 0.9))
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Outcomes live in our job records; Celery's result meta would be a second, weaker copy.
        task_ignore_result=True,
        task_queues=(Queue(CPU_QUEUE), Queue(GPU_QUEUE)),
        task_default_queue=CPU_QUEUE,
        task_routes={
            INGEST_TASK: {"queue": CPU_QUEUE},
            GENERATE_TASK: {"queue": GPU_QUEUE},
            VIDEO_TASK: {"queue": CPU_QUEUE},
            WEBHOOK_TASK: {"queue": CPU_QUEUE},
        },
        # A job is acknowledged only once handled, and comes back if its worker dies mid-way.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # A dead worker's unacknowledged messages come back once the visibility timeout has
            # passed; scan for them every few seconds rather than kombu's default of every 100 s.
            "unacked_restore_interval": restore_interval,
            "unacked_restore_throttle": 1,
            # One worker scans at a time, under a lock with this expiry. A worker killed mid-scan
            # leaves the lock behind: kombu's 300 s would hold every restore back that long. A
            # scan takes milliseconds, and scans that overlap restore each message once (each
            # restore is a transaction on the unacknowledged hash).
            "unacked_mutex_expire": math.ceil(2 * restore_interval),
        },
        # A pool process replacing a dead one must start within this or it is killed and replaced
        # in turn. Celery's 4 s is shorter than a loaded machine needs to start one, and the
        # replacements then die for ever while the worker holds its job (nothing runs it).
        worker_proc_alive_timeout=settings.worker_start_timeout_s,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=soft_limit,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app
