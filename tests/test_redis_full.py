"""Redis full (maxmemory with noeviction): submissions answer 503 and leave nothing behind, in\nRedis or in storage."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import redis

from api.app import create_app
from common.settings import load_settings
from tests.redis_server import RedisServer

# A Redis server of the test's own is started.
pytestmark = pytest.mark.service


def _fill(url: str) -> redis.Redis:
    direct = redis.Redis.from_url(url)
    # Big values first, then ever smaller ones, until not even a small write fits.
    for size in (100_000, 1_000, 50):
        try:
            for n in range(100_000):
                direct.set(f"filler:{size}:{n}", b"x" * size)
        except redis.exceptions.OutOfMemoryError:
            continue
        raise AssertionError("the store never filled up")
    return direct


def test_a_full_job_store_answers_503_and_creates_nothing(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction").start()
    try:
        settings = load_settings({"VIDEOQA_REDIS_URL": server.url, "VIDEOQA_STORAGE_URL": str(tmp_path / "store")})
        client = create_app(settings).test_client()
        body = {"question": "q", "videos": [{"url": "https://93.184.215.14/v.mp4"}]}
        assert client.post("/v1/jobs", json=body).status_code == 202

        direct = _fill(server.url)
        before = sorted(direct.keys("videoqa:job:*"))
        queued_before = direct.llen("cpu")

        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert response.get_json()["error"] == {
            "code": "service_unavailable",
            "message": "the job store is full; no job was created; try again later",
        }
        assert sorted(direct.keys("videoqa:job:*")) == before
        assert direct.llen("cpu") == queued_before

        # Reads still work while the store is full.
        assert client.get("/v1/jobs").status_code == 200
    finally:
        server.stop()


def test_an_upload_is_removed_when_the_job_store_refuses_its_record(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction").start()
    try:
        store = tmp_path / "store"
        settings = load_settings({"VIDEOQA_REDIS_URL": server.url, "VIDEOQA_STORAGE_URL": str(store)})
        client = create_app(settings).test_client()
        _fill(server.url)

        response = client.post(
            "/v1/jobs",
            data={"question": "q", "videos": [(io.BytesIO(b"not really a video"), "a.mp4")]},
            content_type="multipart/form-data",
        )
        assert response.status_code == 503
        assert [path for path in store.rglob("*") if path.is_file()] == []
    finally:
        server.stop()


def test_uploads_are_removed_when_a_later_file_is_refused(tmp_path: Path, spare_redis_url: str) -> None:
    store = tmp_path / "store"
    settings = load_settings({"VIDEOQA_REDIS_URL": spare_redis_url, "VIDEOQA_STORAGE_URL": str(store)})
    client = create_app(settings).test_client()
    response = client.post(
        "/v1/jobs",
        data={"question": "q", "videos": [(io.BytesIO(b"first"), "a.mp4"), (io.BytesIO(b""), "empty.mp4")]},
        content_type="multipart/form-data",
    )
    assert response.status_code == 400
    assert [path for path in store.rglob("*") if path.is_file()] == []
