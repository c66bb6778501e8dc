"""Rate limits per API key (or per client address when authentication is off), counted in Redis
so that every API process sees the same totals."""

from __future__ import annotations

from flask import Blueprint, Flask, request
from flask_limiter import Limiter

from api.auth import current_tenant
from common.settings import Settings


def _limit_key() -> str:
    tenant = current_tenant()
    if tenant.key_sha256:
        return f"tenant:{tenant.name}"
    return f"addr:{request.remote_addr or 'unknown'}"


def init_limits(app: Flask, blueprint: Blueprint, settings: Settings) -> Limiter:
    limiter = Limiter(
        key_func=_limit_key,
        app=app,
        storage_uri=settings.redis_url,
        strategy="fixed-window",
        headers_enabled=True,
        key_prefix="videoqa:limits",
        # When Redis is down the submission fails on its own with a clear 503; the limiter should
        # not turn that into a 500.
        swallow_errors=True,
    )
    limiter.limit(settings.rate_limit, methods=["POST"])(blueprint)
    return limiter
