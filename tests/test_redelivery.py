"""A generate message delivered again after its job ended (the worker died after writing the
answer, before acknowledging) does not run the model again and leaves the answer alone."""

from __future__ import annotations

import time
from pathlib import Path

import redis
import requests

from common.celery_config import GENERATE_TASK, make_celery
from tests.conftest import RunningService


def test_redelivered_message_of_a_finished_job_is_a_no_op(service: RunningService, sample_videos: list[Path]) -> None:
    job_id = service.upload(sample_videos[0], question="once?", num_frames="2", max_new_tokens="4")
    first = service.wait(job_id)
    assert first["status"] == "succeeded"

    make_celery(service.settings).send_task(GENERATE_TASK, args=[job_id])
    broker = redis.Redis.from_url(service.settings.redis_url)
    handled = f"generate: job {job_id} is succeeded; nothing to do"
    deadline = time.monotonic() + 120
    while handled not in (service.logs / "gpu0.log").read_text(errors="replace"):
        assert time.monotonic() < deadline, service.tail_logs()
        time.sleep(0.1)
    # The worker acknowledges the message once the task returns, right after that line.
    while (broker.llen("gpu") or broker.hlen("unacked")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert broker.llen("gpu") == 0 and broker.hlen("unacked") == 0
    again = requests.get(service.url(f"/v1/jobs/{job_id}"), timeout=10).json()
    assert again["result"] == first["result"]
    assert again["attempts"] == first["attempts"]
    assert again["stages"]["generate"] == first["stages"]["generate"]
    assert again["updated_at"] == first["updated_at"]
