"""The workers: Celery wiring, the CPU and GPU stages, media handling, the sandbox and the command line."""
