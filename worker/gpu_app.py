"""Entry point of GPU workers: ``celery -A worker.gpu_app worker -Q gpu --concurrency 1``."""

from worker.app.factory import build_worker_app

app = build_worker_app("gpu")
