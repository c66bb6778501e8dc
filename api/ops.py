"""Routes for operators: readiness, Prometheus metrics, the OpenAPI document and its page."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from api.docs import render_docs
from api.openapi import build_spec
from common.logging_config import redact
from common.readiness import ready_workers

ops = Blueprint("ops", __name__)

# A key nobody writes: asking whether it exists makes a real round trip to the object store.
_STORAGE_PROBE_KEY = "readyz/probe"


def _services() -> Any:
    return current_app.extensions["videoqa"]


@cache
def _spec() -> dict[str, Any]:
    try:
        release = version("videoqa")
    except PackageNotFoundError:
        release = "0"
    return build_spec(release)


def _problem(exc: BaseException) -> str:
    return redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]


@ops.get("/readyz")
def readyz() -> tuple[Response, int]:
    services = _services()
    checks: dict[str, Any] = {}
    reasons: list[str] = []
    try:
        services.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means not ready, with its reason
        checks["redis"] = "unreachable"
        reasons.append(f"redis: {_problem(exc)}")
    try:
        services.store.ping()
        services.store.exists(_STORAGE_PROBE_KEY)
        checks["storage"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means not ready, with its reason
        checks["storage"] = "unreachable"
        reasons.append(f"storage: {_problem(exc)}")
    if checks["redis"] == "ok":
        workers = [worker.hostname for worker in ready_workers(services.redis)]
        checks["gpu_workers"] = len(workers)
        checks["gpu_worker_names"] = workers
        if not workers:
            reasons.append("no GPU worker is ready (none has loaded its model and sent a heartbeat)")
    else:
        checks["gpu_workers"] = 0
    ready = not reasons
    body = {"status": "ready" if ready else "not_ready", "reasons": reasons, "checks": checks}
    return jsonify(body), 200 if ready else 503


@ops.get("/metrics")
def metrics() -> Response:
    registry: CollectorRegistry = _services().metrics
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


@ops.get("/openapi.json")
def openapi() -> Response:
    return jsonify(_spec())


@ops.get("/docs")
def docs() -> str:
    return render_docs(_spec())
