"""Flask application factory: ``create_app()`` for gunicorn, ``create_app(settings)`` for tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis
from celery import Celery
from flask import Flask
from flask.json.provider import DefaultJSONProvider
from prometheus_client import CollectorRegistry

from api.auth import Authenticator, parse_api_keys
from api.chat_routes import bp as openai_bp
from api.errors import register_error_handlers
from api.idempotency import IdempotencyKeys
from api.limits import init_limits
from api.logs import bind_job_ids
from api.ops import ops
from api.page import page
from api.routes import bp
from api.video_routes import videos_bp
from common.celery_config import GENERATE_TASK, INGEST_TASK, VIDEO_TASK, make_celery
from common.connections import redis_client
from common.jobs import JobStore
from common.metrics import RedisCollector
from common.readiness import ready_workers
from common.settings import Settings, load_settings
from common.storage import ObjectStore, open_store
from common.videos import VideoStore
from common.webhooks import webhook_sender


@dataclass
class Services:
    """What the routes use, built once per process and attached to the app."""

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


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask(__name__, static_folder=None)  # the page's files are served by api.page
    # Werkzeug refuses a larger body from Content-Length, or stops a chunked one at the cap.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.config["MAX_FORM_PARTS"] = 4 * (settings.max_videos + settings.max_images) + 32
    if isinstance(app.json, DefaultJSONProvider):
        app.json.sort_keys = False  # fields in the order the schemas declare them
    client = redis_client(settings)
    celery = make_celery(settings)
    # A "task-sent" event would be a second broker write on every submission (an eighth of its
    # cost); Flower and the metrics see a task from the moment a worker receives it.
    celery.conf.task_send_sent_event = False
    # Read from Redis at scrape time, so every API process reports the same values.
    metrics = CollectorRegistry()
    metrics.register(RedisCollector(client, lambda: [worker.hostname for worker in ready_workers(client)]))
    app.extensions["videoqa"] = Services(
        settings=settings,
        jobs=JobStore(client, ttl_s=settings.job_ttl_s, on_terminal=webhook_sender(client, celery)),
        store=open_store(settings),
        celery=celery,
        redis=client,
        metrics=metrics,
        idempotency=IdempotencyKeys(client, ttl_s=settings.idempotency_ttl_s),
        videos=VideoStore(client, ttl_s=settings.storage_retention_s),
    )
    register_error_handlers(app)
    # Authentication runs first, so the rate limiter counts per tenant.
    app.before_request(Authenticator(parse_api_keys(settings.api_keys)).authenticate_request)
    init_limits(app, [bp, openai_bp, videos_bp], settings)
    app.register_blueprint(bp)
    app.register_blueprint(openai_bp)
    app.register_blueprint(videos_bp)
    app.register_blueprint(ops)
    app.register_blueprint(page)
    bind_job_ids(app)
    return app
