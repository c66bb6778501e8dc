"""What a worker process holds: settings, clients, and on GPU workers the loaded model, its batch
size and the queue it claims batches from.

Clients are created lazily, in the process that uses them: prefork children must not inherit
sockets opened by their parent. The app factory attaches them to the Celery app
(``attach_resources``); blueprint steps and tasks find them with ``resources_of(app)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from common.celery_config import GENERATE_TASK
from common.connections import redis_client
from common.jobs import JobStore
from common.readiness import WorkerReadiness
from common.settings import Settings
from common.storage import ObjectStore, open_store
from common.url_policy import UrlPolicy
from common.videos import VideoStore
from common.webhooks import webhook_sender
from worker.cpu.stage import IngestContext
from worker.cpu.video_stage import VideoContext
from worker.cpu.webhooks import WebhookContext
from worker.gpu.claims import GpuQueue
from worker.gpu.lifecycle import describe
from worker.gpu.model import LoadedModel, load_model
from worker.gpu.pipeline import Prefetching
from worker.gpu.prefix_cache import PrefixCache, default_prefix_cache_bytes
from worker.gpu.stage import AnswerContext
from worker.media.geometry import DEFAULT_RESAMPLE, FrameGeometry, processor_geometry

log = logging.getLogger(__name__)


def size_setting_mismatches(config: Any, settings: Settings) -> list[str]:
    """Where the settings that size jobs at submission (the API never loads the model) disagree
    with the model this worker loaded."""
    from worker.gpu.batch import tokens_per_image

    problems = []
    per_image = tokens_per_image(config)
    if per_image != settings.image_tokens:
        problems.append(
            f"VIDEOQA_IMAGE_TOKENS is {settings.image_tokens} but {settings.model} takes {per_image} tokens per image: "
            "job sizes are estimated wrong; set it on the API and the workers"
        )
    positions = getattr(config.text_config, "max_position_embeddings", None)
    if positions is not None and settings.context_tokens > positions:
        problems.append(
            f"VIDEOQA_CONTEXT_TOKENS is {settings.context_tokens} but {settings.model} has a context of {positions} tokens"
        )
    return problems


@lru_cache(maxsize=4)
def load_geometry(model: str, image_size: int = 384) -> FrameGeometry:
    """Size and resample from a local model folder's image processor config (no weights), else
    ``image_size`` square with the served model's filter; never a hub request."""
    if not Path(model).is_dir():
        return FrameGeometry(width=image_size, height=image_size, resample=DEFAULT_RESAMPLE)
    from transformers import AutoImageProcessor

    return processor_geometry(AutoImageProcessor.from_pretrained(model), model)


class WorkerResources:
    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings = settings
        self.celery = celery
        self.model: LoadedModel | None = None
        self.hostname = ""
        self.batch_size = 1
        self.ready_since = 0.0
        self.prefixes: PrefixCache | None = None

    @cached_property
    def jobs(self) -> JobStore:
        client = redis_client(self.settings)
        return JobStore(client, ttl_s=self.settings.job_ttl_s, on_terminal=webhook_sender(client, self.celery))

    @cached_property
    def videos(self) -> VideoStore:
        return VideoStore(self.jobs.client, ttl_s=self.settings.storage_retention_s)

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.settings)

    @cached_property
    def geometry(self) -> FrameGeometry:
        return load_geometry(self.settings.model, self.settings.image_size)

    @cached_property
    def readiness_client(self) -> redis.Redis:
        return redis_client(self.settings)

    @cached_property
    def gpu_queue(self) -> GpuQueue:
        return GpuQueue(
            self.celery,
            hostname=self.hostname,
            max_retries=self.settings.transient_retries,
            backoff_s=self.settings.retry_backoff_s,
        )

    def load_model(self) -> LoadedModel:
        if self.model is None:
            self.model = load_model(self.settings)
        return self.model

    def prepare_gpu(self, hostname: str) -> None:
        """Load the model, run one warm-up generation and size the batch (before any job).
        Raises ``worker.gpu.model.ModelLoadError``."""
        from worker.gpu.batch import default_batch_size
        from worker.gpu.model import ModelLoadError, memory_info, warm_up

        self.hostname = hostname
        loaded = self.load_model()
        started = time.perf_counter()
        try:
            warm_up(loaded)
        except Exception as exc:  # a model that loads but cannot generate is no more usable
            raise ModelLoadError(f"warm-up generation with {loaded.model_id} failed: {exc}") from exc
        log.info("warm-up generation took %.2f s", time.perf_counter() - started)
        for problem in size_setting_mismatches(loaded.model.config, self.settings):
            log.warning("%s", problem)
        self._check_geometry(loaded)
        prefix_bytes = self.settings.prefix_cache_bytes
        if prefix_bytes is None:
            prefix_bytes = default_prefix_cache_bytes(loaded.device, memory_info(loaded)[0])
        self.prefixes = PrefixCache(prefix_bytes, loaded.model_id)
        # The prefix cache fills over time: the batch is sized as if it were full.
        self.batch_size = self.settings.batch_size or default_batch_size(loaded, set_aside_bytes=prefix_bytes)
        log.info("prefix cache: up to %.2f GiB; batches of up to %d jobs", prefix_bytes / 2**30, self.batch_size)
        self.ready_since = time.time()

    def _check_geometry(self, loaded: LoadedModel) -> None:
        # CPU workers size frames for a hub model from VIDEOQA_IMAGE_SIZE, never asking the hub.
        try:
            served = processor_geometry(loaded.processor.image_processor, loaded.model_id)
        except (AttributeError, RuntimeError):
            return
        stored = load_geometry(self.settings.model, self.settings.image_size)
        if (served.width, served.height) != (stored.width, stored.height):
            log.warning(
                "CPU workers store frames of %dx%d but %s resizes to %dx%d: set VIDEOQA_IMAGE_SIZE on the workers",
                stored.width, stored.height, loaded.model_id, served.width, served.height,
            )  # fmt: skip

    def describe_readiness(self) -> WorkerReadiness:
        return describe(
            self.load_model(),
            hostname=self.hostname,
            batch_size=self.batch_size,
            batch_wait_ms=self.settings.batch_wait_ms,
            ready_since=self.ready_since,
        )

    def ingest_context(self) -> IngestContext:
        return IngestContext(
            settings=self.settings,
            jobs=self.jobs,
            store=self.store,
            geometry=lambda: self.geometry,
            enqueue_answer=lambda job_id: self.celery.send_task(GENERATE_TASK, args=[job_id]),
            videos=self.videos,
        )

    def video_context(self) -> VideoContext:
        return VideoContext(
            settings=self.settings, videos=self.videos, store=self.store, geometry=lambda: self.geometry
        )

    def webhook_context(self) -> WebhookContext:
        return WebhookContext(
            settings=self.settings,
            jobs=self.jobs,
            policy=UrlPolicy.from_allowlist(self.settings.fetch_allowlist_entries),
        )

    @cached_property
    def fetch_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.settings.fetch_threads, thread_name_prefix="frame-fetch")

    @cached_property
    def _answer_context(self) -> AnswerContext:
        # The solo pool enforces no task time limit: generation ends itself at the same limit.
        return AnswerContext(
            jobs=self.jobs,
            store=self.store,
            model=self.load_model(),
            time_limit_s=self.settings.task_time_limit_s,
            max_attempts=self.settings.max_attempts,
            fetch_pool=self.fetch_pool,
            inflight=self.settings.inflight_batching,
            max_rows=self.batch_size,
            prefixes=self.prefixes,
        )

    def answer_context(self) -> AnswerContext:
        """One per process: it also counts the seconds spent in the model."""
        return self._answer_context

    def prefetching(self, should_stop: Callable[[], bool]) -> Prefetching | None:
        """How the generate task pipelines batches; None with ``VIDEOQA_PREFETCH=off``, and with
        ``auto`` on the CPU, where the preparing thread takes cores the model would use."""
        if not prefetch_enabled(self.settings.prefetch, self.load_model().device):
            return None
        return Prefetching(
            ahead_ctx=self._ahead_context,
            # Every message a task holds is settled within the visibility timeout (worker.gpu.pipeline).
            budget_s=self.settings.visibility_timeout_s - self.settings.task_time_limit_s,
            should_stop=should_stop,
        )

    @cached_property
    def _ahead_context(self) -> AnswerContext:
        from worker.gpu.prefetch import with_own_processor

        return replace(self._answer_context, model=with_own_processor(self.load_model()), model_seconds=0.0)


def prefetch_enabled(setting: str, device: str) -> bool:
    """``VIDEOQA_PREFETCH`` for a model on ``device``: ``auto`` is on with CUDA only."""
    if setting == "auto":
        return device.startswith("cuda")
    return setting == "on"


# The attribute of the Celery app that holds its process's resources.
_ATTRIBUTE = "videoqa_resources"


def attach_resources(app: Celery, resources: WorkerResources) -> None:
    setattr(app, _ATTRIBUTE, resources)


def resources_of(app: Celery) -> WorkerResources:
    """The resources ``worker.app.factory.build_worker_app`` attached to ``app``."""
    resources = getattr(app, _ATTRIBUTE, None)
    if not isinstance(resources, WorkerResources):
        raise RuntimeError("this Celery app has no worker resources: build it with build_worker_app")
    return resources
