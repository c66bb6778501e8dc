"""Entry point of CPU workers: ``celery -A worker.cpu_app worker -Q cpu``."""

from worker.app.factory import build_worker_app

app = build_worker_app("cpu")
