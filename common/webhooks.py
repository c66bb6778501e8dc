"""Handing a job's webhook to the CPU workers once the job has ended.

The process that ends a job (a GPU worker, a CPU worker, the API on cancel) only sends a task by
name; the delivery, its retries and its waiting happen on a CPU worker (``worker.cpu.webhooks``).
"""

from __future__ import annotations

from collections.abc import Callable

import redis
from celery import Celery

from common.celery_config import WEBHOOK_TASK
from common.jobs import WEBHOOK_FIELD, JobStore


def webhook_sender(client: redis.Redis, celery: Celery) -> Callable[[str], None]:
    """A ``JobStore`` terminal hook: sends the delivery task for jobs that asked for a webhook."""

    def send(job_id: str) -> None:
        if client.hexists(JobStore.key(job_id), WEBHOOK_FIELD):
            celery.send_task(WEBHOOK_TASK, args=[job_id])

    return send
