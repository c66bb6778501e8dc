"""Idempotent submission through the running service: a retried submission with the same
``Idempotency-Key`` gets the first job (and stores nothing new), a different request under the
same key is refused, and concurrent identical submissions make one job."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from api.app import create_app
from common.api_keys import hash_key
from common.settings import load_settings
from tests.conftest import BUCKET, RunningService

BODY = {"question": "What?", "videos": [{"url": "http://127.0.0.1:9/a.mp4"}], "generation": {"max_new_tokens": 4}}


def _key() -> str:
    return f"order-{uuid.uuid4()}"


def _upload(service: RunningService, video: Path, key: str, question: str = "What is shown?") -> requests.Response:
    with open(video, "rb") as handle:
        return requests.post(
            service.url("/v1/jobs"),
            files=[("videos", (video.name, handle, "video/mp4"))],
            data={"question": question, "num_frames": "2", "max_new_tokens": "4"},
            headers={"Idempotency-Key": key},
            timeout=30,
        )


def _uploads(s3: Any) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="service/uploads/")
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def test_same_key_and_upload_answer_the_same_job_without_storing_it_again(
    service: RunningService, s3: Any, sample_videos: list[Path]
) -> None:
    key = _key()
    before = _uploads(s3)
    first = _upload(service, sample_videos[0], key)
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    assert "Idempotent-Replayed" not in first.headers

    again = _upload(service, sample_videos[0], key)
    assert again.status_code == 202, again.text
    assert again.json()["id"] == job_id
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    # Only the first job's upload was ever stored (it goes once the job ended).
    assert {name.split("/")[2] for name in _uploads(s3) - before} <= {job_id}
    assert service.wait(job_id)["status"] == "succeeded"
    assert _upload(service, sample_videos[0], key).json()["id"] == job_id  # and after it ended


def test_same_key_with_another_request_is_422_idempotency_conflict(
    service: RunningService, s3: Any, sample_videos: list[Path]
) -> None:
    key = _key()
    assert _upload(service, sample_videos[0], key).status_code == 202
    before = _uploads(s3)
    for response in (
        _upload(service, sample_videos[0], key, question="Something else?"),
        _upload(service, sample_videos[1], key),  # same fields, other bytes
        requests.post(service.url("/v1/jobs"), json=BODY, headers={"Idempotency-Key": key}, timeout=30),
    ):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "idempotency_conflict"
    assert _uploads(s3) <= before


def test_without_a_key_or_with_another_key_the_same_body_is_a_new_job(service: RunningService) -> None:
    headers = [{}, {}, {"Idempotency-Key": _key()}, {"Idempotency-Key": _key()}]
    ids = {requests.post(service.url("/v1/jobs"), json=BODY, headers=h, timeout=30).json()["id"] for h in headers}
    assert len(ids) == 4


def test_concurrent_identical_submissions_make_one_job(service: RunningService) -> None:
    key = _key()

    def submit(_: int) -> requests.Response:
        return requests.post(service.url("/v1/jobs"), json=BODY, headers={"Idempotency-Key": key}, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(submit, range(8)))
    assert [r.status_code for r in responses] == [202] * 8, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum("Idempotent-Replayed" in r.headers for r in responses) == 7


def test_a_malformed_key_is_400(service: RunningService) -> None:
    response = requests.post(service.url("/v1/jobs"), json=BODY, headers={"Idempotency-Key": "k" * 256}, timeout=30)
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]["message"]


def test_a_key_names_a_job_per_tenant(spare_redis_url: str) -> None:
    # API keys on an app of its own (the shared service runs without them); no worker needed.
    keys = {"acme": "vqa_key_of_acme_0123456789", "beta": "vqa_key_of_beta_9876543210"}
    settings = load_settings(
        {
            "VIDEOQA_REDIS_URL": spare_redis_url,
            "VIDEOQA_STORAGE_URL": "s3://videoqa-test/idempotency",
            "VIDEOQA_API_KEYS": ",".join(f"{tenant}:{hash_key(key)}" for tenant, key in keys.items()),
        }
    )
    client = create_app(settings).test_client()
    body = {"question": "What?", "videos": [{"url": "https://93.184.215.14/v.mp4"}]}

    def submit(tenant: str) -> Any:
        headers = {"Authorization": f"Bearer {keys[tenant]}", "Idempotency-Key": "same-key"}
        response = client.post("/v1/jobs", json=body, headers=headers)
        assert response.status_code == 202, response.get_json()
        return response.get_json()

    acme, beta = submit("acme"), submit("beta")
    assert (acme["tenant"], beta["tenant"]) == ("acme", "beta")
    assert acme["id"] != beta["id"]
    assert submit("acme")["id"] == acme["id"]
