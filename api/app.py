"""Flask application factory: ``create_app()`` for gunicorn, ``create_app(settings)`` for tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from celery import Celery
from flask import Flask

from api.errors import register_error_handlers
from api.routes import bp
from common.celery_config import INGEST_TASK, make_celery
from common.connections import redis_client
from common.jobs import JobStore
from common.settings import Settings, load_settings
from common.storage import ObjectStore, open_store


@dataclass
class Services:
    """What the routes use, built once per process and attached to the app."""

    settings: Settings
    jobs: JobStore
    store: ObjectStore
    celery: Celery

    @property
    def enqueue_ingest(self) -> Callable[[str], None]:
        return lambda job_id: self.celery.send_task(INGEST_TASK, args=[job_id])


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask(__name__)
    # Werkzeug refuses a larger body from Content-Length, or stops a chunked one at the cap.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.config["MAX_FORM_PARTS"] = 4 * (settings.max_videos + settings.max_images) + 32
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["videoqa"] = Services(
        settings=settings,
        jobs=JobStore(redis_client(settings), ttl_s=settings.job_ttl_s),
        store=open_store(settings),
        celery=make_celery(settings),
    )
    register_error_handlers(app)
    app.register_blueprint(bp)
    return app
