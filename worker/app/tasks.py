"""Celery tasks: thin wrappers that hand a job id to the plain stage functions."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from common.celery_config import GENERATE_TASK, INGEST_TASK, RETRY_BACKOFF_MAX_S, VIDEO_TASK, WEBHOOK_TASK
from common.errors import TransientError, VideoQAError
from worker.app.resources import WorkerResources
from worker.cpu.stage import ingest_job
from worker.cpu.video_stage import ingest_stored_video
from worker.cpu.webhooks import deliver
from worker.gpu.pipeline import answer_claimed_batch

log = logging.getLogger(__name__)


def failure_of(exc: BaseException) -> tuple[str, str]:
    """The error code and message a job ends with when its task gives up."""
    if isinstance(exc, (SoftTimeLimitExceeded, TimeLimitExceeded)):
        return "timeout", "the job ran past its time limit"
    if isinstance(exc, VideoQAError):
        return exc.code, exc.message
    return "internal", "internal error while processing the job"


def _stopping() -> bool:
    """A warm or cold shutdown was asked for (Celery's flags, set by its signal handlers)."""
    from celery.worker import state

    return bool(state.should_stop is not None or state.should_terminate is not None)


def register_tasks(app: Celery, resources: WorkerResources) -> None:
    class JobTask(Task):
        """Ends the job as failed when the task gives up (retries spent, time limit, a bug)."""

        def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
            job_id = args[0] if args else kwargs.get("job_id")
            if job_id:
                code, message = failure_of(exc)
                resources.jobs.fail(job_id, code, message)

    retry_policy = {
        "autoretry_for": (TransientError,),
        "retry_backoff": resources.settings.retry_backoff_s,
        "retry_backoff_max": RETRY_BACKOFF_MAX_S,
        "retry_jitter": True,
        "max_retries": resources.settings.transient_retries,
    }

    @app.task(name=INGEST_TASK, base=JobTask, **retry_policy)
    def ingest(job_id: str) -> None:
        ingest_job(job_id, resources.ingest_context())

    class VideoTask(Task):
        """Ends the stored video as failed when its task gives up."""

        def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
            video_id = args[0] if args else kwargs.get("video_id")
            if video_id:
                resources.videos.fail(video_id, *failure_of(exc))

    @app.task(name=VIDEO_TASK, base=VideoTask, **retry_policy)
    def ingest_video(video_id: str) -> None:
        ingest_stored_video(video_id, resources.video_context())

    def fail_job(job_id: str, exc: BaseException) -> None:
        resources.jobs.fail(job_id, *failure_of(exc))

    @app.task(name=GENERATE_TASK, base=JobTask, **retry_policy)
    def answer(job_id: str) -> None:
        # The delivered job leads a batch of up to batch_size queued jobs (worker.gpu.claims).
        answer_claimed_batch(
            job_id,
            gpu_queue=resources.gpu_queue,
            ctx=resources.answer_context(),
            batch_size=resources.batch_size,
            wait_s=resources.settings.batch_wait_ms / 1000,
            fail_job=fail_job,
            prefetching=resources.prefetching(_stopping),
        )

    # Not a JobTask: a delivery that fails never changes the job's outcome.
    @app.task(name=WEBHOOK_TASK, bind=True, max_retries=None)
    def webhook(self: Task, job_id: str) -> None:
        delay = deliver(job_id, resources.webhook_context())
        if delay is not None:
            raise self.retry(countdown=delay)
