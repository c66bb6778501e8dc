"""API keys, tenants and rate limits, through the real gunicorn API and Redis."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient

from api.app import create_app
from common.api_keys import hash_key
from common.settings import load_settings
from worker.cli.stack import Stack, api_command, free_port, wait_for_http

KEY_A = "vqa_key_of_tenant_a_0123456789"
KEY_B = "vqa_key_of_tenant_b_9876543210"
KEYS = f"acme:{hash_key(KEY_A)}:s3://media/acme/,beta:{hash_key(KEY_B)}"
VIDEO = {"url": "https://93.184.215.14/v.mp4"}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def client(spare_redis_url: str) -> FlaskClient:
    settings = load_settings(
        {
            "VIDEOQA_REDIS_URL": spare_redis_url,
            # s3:// inputs need S3 storage; these submissions never write to it.
            "VIDEOQA_STORAGE_URL": "s3://videoqa-test/access",
            "VIDEOQA_API_KEYS": KEYS,
            "VIDEOQA_MAX_ACTIVE_JOBS_PER_TENANT": "2",
        }
    )
    return create_app(settings).test_client()


def test_missing_or_wrong_key_is_401(client: FlaskClient) -> None:
    for headers in ({}, _auth("nope"), {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}):
        response = client.get("/v1/jobs", headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"]["code"] == "unauthorized"
    assert client.get("/healthz").status_code == 200  # probes need no key


def test_tenants_cannot_see_cancel_or_list_each_others_jobs(client: FlaskClient) -> None:
    created = client.post("/v1/jobs", json={"question": "q", "videos": [VIDEO]}, headers=_auth(KEY_A))
    assert created.status_code == 202
    job = created.get_json()
    assert job["tenant"] == "acme"
    assert client.get(f"/v1/jobs/{job['id']}", headers=_auth(KEY_B)).status_code == 404
    assert client.delete(f"/v1/jobs/{job['id']}", headers=_auth(KEY_B)).status_code == 404
    assert client.get("/v1/jobs", headers=_auth(KEY_B)).get_json()["jobs"] == []
    assert [j["id"] for j in client.get("/v1/jobs", headers=_auth(KEY_A)).get_json()["jobs"]] == [job["id"]]
    assert client.get(f"/v1/jobs/{job['id']}", headers=_auth(KEY_A)).get_json()["status"] == "queued"


def test_s3_keys_are_limited_to_the_tenants_prefixes(client: FlaskClient) -> None:
    own = client.post(
        "/v1/jobs", json={"question": "q", "videos": [{"url": "s3://media/acme/a.mp4"}]}, headers=_auth(KEY_A)
    )
    assert own.status_code == 202
    foreign = client.post(
        "/v1/jobs", json={"question": "q", "videos": [{"url": "s3://media/beta/b.mp4"}]}, headers=_auth(KEY_A)
    )
    assert foreign.status_code == 400
    assert foreign.get_json()["error"]["details"] == [
        {"field": "videos.0.url", "message": "outside the s3 prefixes of this API key"}
    ]
    none = client.post(
        "/v1/jobs", json={"question": "q", "videos": [{"url": "s3://media/acme/a.mp4"}]}, headers=_auth(KEY_B)
    )
    assert none.status_code == 400


def test_a_tenant_has_a_cap_on_jobs_in_flight(client: FlaskClient) -> None:
    ids = [
        client.post("/v1/jobs", json={"question": "q", "videos": [VIDEO]}, headers=_auth(KEY_A)).get_json()["id"]
        for _ in range(2)
    ]
    refused = client.post("/v1/jobs", json={"question": "q", "videos": [VIDEO]}, headers=_auth(KEY_A))
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "too_many_active_jobs"
    assert client.post("/v1/jobs", json={"question": "q", "videos": [VIDEO]}, headers=_auth(KEY_B)).status_code == 202
    client.delete(f"/v1/jobs/{ids[0]}", headers=_auth(KEY_A))
    assert client.post("/v1/jobs", json={"question": "q", "videos": [VIDEO]}, headers=_auth(KEY_A)).status_code == 202


@pytest.fixture()
def limited_api(spare_redis_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """gunicorn with two worker processes: the limit must hold across both."""
    port = free_port()
    env = {
        "VIDEOQA_REDIS_URL": spare_redis_url,
        "VIDEOQA_STORAGE_URL": str(tmp_path / "store"),
        "VIDEOQA_API_KEYS": KEYS,
        "VIDEOQA_RATE_LIMIT": "6/minute",
        "PATH": "/usr/bin:/bin",
    }
    stack = Stack(env=env, logs=tmp_path)
    stack.start("api", api_command(port=port, workers=2))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}", tmp_path / "api.log"
    finally:
        stack.stop()


def test_rate_limit_per_key_across_api_processes(limited_api: tuple[str, Path]) -> None:
    base, log = limited_api
    statuses = []
    for _ in range(8):
        # A fresh connection each time, so requests spread over both gunicorn workers.
        response = requests.post(
            f"{base}/v1/jobs",
            json={"question": "q", "videos": [VIDEO]},
            headers={**_auth(KEY_A), "Connection": "close"},
            timeout=10,
        )
        statuses.append(response.status_code)
    assert statuses == [202] * 6 + [429] * 2
    assert int(response.headers["Retry-After"]) > 0
    assert response.json()["error"]["code"] == "too_many_requests"
    # Another key has its own budget; polling is not counted.
    assert (
        requests.post(
            f"{base}/v1/jobs", json={"question": "q", "videos": [VIDEO]}, headers=_auth(KEY_B), timeout=10
        ).status_code
        == 202
    )
    assert requests.get(f"{base}/v1/jobs", headers=_auth(KEY_A), timeout=10).status_code == 200
    requests.get(f"{base}/v1/jobs", headers=_auth("vqa_wrong_key_value"), timeout=10)
    served = subprocess.run(["grep", "-c", "POST /v1/jobs", str(log)], capture_output=True, text=True).stdout.strip()
    assert int(served) >= 9
    text = log.read_text()
    for secret in (KEY_A, KEY_B, "vqa_wrong_key_value", hash_key(KEY_A)):
        assert secret not in text
