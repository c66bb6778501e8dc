"""Untrusted media: probing, indexing, seeking, frame sampling and image codecs; no Celery, Redis or models."""
