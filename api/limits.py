"""Rate limits per API key (or per client address when authentication is off), counted in Redis
so that every API process sees the same totals."""

from __future__ import annotations

import math
import time

from flask import Blueprint, Flask, Response, request
from flask_limiter import Limiter, RateLimitExceeded

from api.auth import current_tenant
from api.errors import error_response
from common.settings import Settings


def _limit_key() -> str:
    tenant = current_tenant()
    if tenant.key_sha256:
        return f"tenant:{tenant.name}"
    return f"addr:{request.remote_addr or 'unknown'}"


def init_limits(app: Flask, blueprints: list[Blueprint], settings: Settings) -> Limiter:
    limiter = Limiter(
        key_func=_limit_key,
        app=app,
        storage_uri=settings.redis_url,
        strategy="fixed-window",
        # X-RateLimit-* on every answer would cost two more Redis reads per request; only the
        # refusal carries Retry-After (below).
        headers_enabled=False,
        key_prefix="videoqa:limits",
        # When Redis is down the submission fails on its own with a clear 503; the limiter should
        # not turn that into a 500.
        swallow_errors=True,
    )
    # One count per key across the blueprints: a chat completion is a job submission too.
    shared = limiter.shared_limit(settings.rate_limit, scope="submissions", methods=["POST"])
    for blueprint in blueprints:
        shared(blueprint)

    @app.errorhandler(RateLimitExceeded)
    def _refused(exc: RateLimitExceeded) -> tuple[Response, int]:
        breached = limiter.current_limit
        wait_s = math.ceil(breached.reset_at - time.time()) if breached is not None else 1
        response, status = error_response(
            429, "too_many_requests", f"rate limit {exc.description} exceeded; retry after {max(1, wait_s)} s"
        )
        response.headers["Retry-After"] = str(max(1, wait_s))
        return response, status

    return limiter
