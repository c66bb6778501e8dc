"""``/readyz`` answers 503 with its reasons until Redis, storage and a GPU worker are ready."""

from __future__ import annotations

import time
from pathlib import Path

import requests

from api.app import create_app
from common.settings import Settings, load_settings
from tests.conftest import RunningService
from worker.cli.stack import free_port


def test_without_a_gpu_worker_it_is_not_ready_and_says_why(local_settings: Settings) -> None:
    response = create_app(local_settings).test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "not_ready"
    assert body["checks"]["redis"] == "ok" and body["checks"]["storage"] == "ok"
    assert body["checks"]["gpu_workers"] == 0
    assert len(body["reasons"]) == 1 and "no GPU worker is ready" in body["reasons"][0]


def test_unreachable_redis_and_storage_are_reasons(tmp_path: Path) -> None:
    closed = free_port()
    settings = load_settings(
        {
            "VIDEOQA_REDIS_URL": f"redis://default:hunter2@127.0.0.1:{closed}/0",
            "VIDEOQA_STORAGE_URL": "s3://videoqa/jobs",
            "VIDEOQA_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        }
    )
    response = create_app(settings).test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["checks"] == {"redis": "unreachable", "storage": "unreachable", "gpu_workers": 0}
    assert [reason.split(":", 1)[0] for reason in body["reasons"]] == ["redis", "storage"]
    assert "hunter2" not in response.get_data(as_text=True)


def test_the_running_service_becomes_ready_once_its_gpu_worker_is(service: RunningService) -> None:
    deadline = time.monotonic() + 120
    while True:
        response = requests.get(service.url("/readyz"), timeout=30)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        assert response.status_code == 503 and response.json()["reasons"], response.text
        time.sleep(0.5)
    body = response.json()
    assert response.status_code == 200, (body, service.tail_logs())
    assert body == {
        "status": "ready",
        "reasons": [],
        "checks": {
            "redis": "ok",
            "storage": "ok",
            "gpu_workers": 1,
            "gpu_worker_names": body["checks"]["gpu_worker_names"],
        },
    }
    assert body["checks"]["gpu_worker_names"][0].startswith("gpu0@")
