"""Bare baselines for ``bench.overhead``: what the pipeline would cost with nothing of ours in it.

* ``celery_app``: a cpu task that sends a gpu task, both no-ops, through the same Redis with the
  same reliability settings as the service (late acks, prefetch 1, JSON). The gpu task records
  how long after the chain was sent it started.
* ``bare_flask_app()``: a Flask app that validates a small JSON body with pydantic, writes one Redis
  hash and sends one Celery task by name; run under gunicorn like the API.

Both read their broker from ``VIDEOQA_BENCH_REDIS_URL`` (the benchmark's own database).
"""

from __future__ import annotations

import os
import time
import uuid

import redis
from celery import Celery
from flask import Flask, jsonify, request
from kombu import Queue
from pydantic import BaseModel, ValidationError

REDIS_URL = os.environ.get("VIDEOQA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
LATENCIES_KEY = "bench:floor:chain"

celery_app = Celery("bare", broker=REDIS_URL, set_as_current=False)
celery_app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_queues=(Queue("bare_cpu"), Queue("bare_gpu")),
    task_default_queue="bare_cpu",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
_results = redis.Redis.from_url(REDIS_URL)


@celery_app.task(name="bare.cpu")
def cpu_step(sent_at: float) -> None:
    celery_app.send_task("bare.gpu", args=[sent_at], queue="bare_gpu")


@celery_app.task(name="bare.gpu")
def gpu_step(sent_at: float) -> None:
    _results.rpush(LATENCIES_KEY, time.time() - sent_at)


class _Body(BaseModel):
    question: str
    videos: list[dict[str, str]]


def bare_flask_app() -> Flask:
    app = Flask(__name__)
    client = redis.Redis.from_url(REDIS_URL)

    @app.post("/v1/jobs")
    def create() -> tuple[object, int]:
        try:
            body = _Body.model_validate(request.get_json())
        except ValidationError as exc:
            return jsonify({"error": str(exc)}), 400
        job_id = uuid.uuid4().hex
        client.hset(f"bench:job:{job_id}", mapping={"status": "queued", "request": body.model_dump_json()})
        celery_app.send_task("bare.cpu", args=[time.time()], queue="bare_cpu")
        return jsonify({"id": job_id, "status": "queued"}), 202

    return app
