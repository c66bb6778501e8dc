"""The per-tenant cap on active jobs holds under concurrent submissions through the running API
(four gunicorn processes, no workers, so every accepted job stays active)."""

from __future__ import annotations

import concurrent.futures
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from common.jobs import ACTIVE_PREFIX, DEFAULT_TENANT
from worker.cli.stack import Stack, api_command, free_port, wait_for_http

CAP = 2
ROUNDS = 8
PER_ROUND = 8


@pytest.fixture()
def capped_api(spare_redis_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        "VIDEOQA_REDIS_URL": spare_redis_url,
        "VIDEOQA_STORAGE_URL": str(tmp_path / "store"),
        "VIDEOQA_MAX_ACTIVE_JOBS_PER_TENANT": str(CAP),
    }
    stack = Stack(env=env, logs=tmp_path)
    stack.start("api", api_command(port=port, workers=4))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout_s=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stack.stop()


def test_concurrent_submissions_never_pass_the_active_job_cap(capped_api: str, spare_redis_url: str) -> None:
    """Rounds of simultaneous submissions, the accepted jobs cancelled between rounds: each round
    is a fresh race for the free slots."""
    # An upload per submission: storing it takes a while between the cap's check and the job's
    # creation, which is where a check-then-create cap lets several submissions through at once.
    video = b"\0" * 1_000_000
    active = redis.Redis.from_url(spare_redis_url)
    barrier = threading.Barrier(PER_ROUND)

    def submit(_: int) -> requests.Response:
        barrier.wait(timeout=60)
        return requests.post(
            f"{capped_api}/v1/jobs",
            files=[("videos", ("a.mp4", io.BytesIO(video), "video/mp4"))],
            data={"question": "q"},
            headers={"Connection": "close"},
            timeout=120,
        )

    accepted_per_round = []
    with concurrent.futures.ThreadPoolExecutor(PER_ROUND) as pool:
        for _ in range(ROUNDS):
            responses = list(pool.map(submit, range(PER_ROUND)))
            accepted = [response.json()["id"] for response in responses if response.status_code == 202]
            refused = [response.json()["error"] for response in responses if response.status_code != 202]
            assert {(error["code"]) for error in refused} <= {"too_many_active_jobs"}, refused
            accepted_per_round.append((len(accepted), active.scard(ACTIVE_PREFIX + DEFAULT_TENANT)))
            for job_id in accepted:
                assert requests.delete(f"{capped_api}/v1/jobs/{job_id}", timeout=30).status_code == 200
    # (accepted, active) per round: the cap, never more.
    assert accepted_per_round == [(CAP, CAP)] * ROUNDS
