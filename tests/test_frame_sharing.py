"""Through the running service with API keys: a tenant's result never shows that another tenant
sent the same bytes before (frames are kept per tenant by default), while a tenant's own second
job on those bytes still reuses its frames."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from common.api_keys import hash_key
from common.job_status import TERMINAL
from tests.conftest import REDIS_HOST, SPARE_REDIS_DB, RunningService, _flushed, service_env, start_service
from worker.cli.stack import wait_for_http

KEY_A = "vqa_key_of_tenant_a_0123456789"
KEY_B = "vqa_key_of_tenant_b_9876543210"


@pytest.fixture(scope="module")
def keyed_service(
    aws_env: dict[str, str], s3: object, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    # A database of its own, so the shared service's workers never take these jobs.
    url = f"redis://{REDIS_HOST}/{SPARE_REDIS_DB}"
    client = _flushed(url)
    env = service_env(
        url,
        aws_env,
        tiny_model_dir,
        VIDEOQA_API_KEYS=f"acme:{hash_key(KEY_A)},beta:{hash_key(KEY_B)}",
        VIDEOQA_STORAGE_URL="s3://videoqa-test/frame-sharing",
    )
    running = start_service(env, tmp_path_factory.mktemp("frame-sharing-logs"))
    try:
        wait_for_http(running.url("/healthz"), timeout_s=60)
        yield running
    finally:
        running.stack.stop()
        client.flushdb()


def _answer(service: RunningService, key: str, video: Path) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    with open(video, "rb") as handle:
        created = requests.post(
            service.url("/v1/jobs"),
            files=[("videos", (video.name, handle, "video/mp4"))],
            data={"question": "What is the cat doing?", "num_frames": "2", "max_new_tokens": "2"},
            headers=headers,
            timeout=30,
        )
    assert created.status_code == 202, created.text
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        job = requests.get(service.url(f"/v1/jobs/{created.json()['id']}"), headers=headers, timeout=10).json()
        if job["status"] in TERMINAL:
            assert job["status"] == "succeeded", (job, service.tail_logs())
            return dict(job["result"])
        time.sleep(0.2)
    raise AssertionError(f"the job did not finish\n{service.tail_logs()}")


def test_another_tenants_same_bytes_are_sampled_afresh(
    keyed_service: RunningService, sample_videos: list[Path]
) -> None:
    first = _answer(keyed_service, KEY_A, sample_videos[0])
    other = _answer(keyed_service, KEY_B, sample_videos[0])
    again = _answer(keyed_service, KEY_A, sample_videos[0])
    assert "decode" in first["timings"]
    assert "decode" in other["timings"] and "store_frames" in other["timings"]
    assert "decode" not in again["timings"]
    assert other["frames"] == first["frames"] == again["frames"]
