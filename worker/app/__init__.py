"""Celery wiring of the worker processes: the app factory, task declarations, process resources and steps."""
