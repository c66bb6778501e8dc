"""Redis full (maxmemory with noeviction): submissions answer 503 and leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import redis

from api.app import create_app
from common.settings import load_settings
from tests.redis_server import RedisServer


def test_a_full_job_store_answers_503_and_creates_nothing(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction").start()
    try:
        settings = load_settings({"VIDEOQA_REDIS_URL": server.url, "VIDEOQA_STORAGE_URL": str(tmp_path / "store")})
        client = create_app(settings).test_client()
        body = {"question": "q", "videos": [{"url": "https://93.184.215.14/v.mp4"}]}
        assert client.post("/v1/jobs", json=body).status_code == 202

        direct = redis.Redis.from_url(server.url)
        # Big values first, then ever smaller ones, until not even a small write fits.
        for size in (100_000, 1_000, 50):
            try:
                for n in range(100_000):
                    direct.set(f"filler:{size}:{n}", b"x" * size)
            except redis.exceptions.OutOfMemoryError:
                continue
            raise AssertionError("the store never filled up")
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
