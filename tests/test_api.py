"""The REST surface through the app factory, with the real Redis (a spare database) behind it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from api.app import create_app
from common.settings import Settings, load_settings

QUESTION = "What is the cat doing?"


@pytest.fixture()
def client(local_settings: Settings) -> FlaskClient:
    return create_app(local_settings).test_client()


def _queued_messages(settings: Settings) -> list[dict]:
    raw = redis.Redis.from_url(settings.redis_url).lrange("cpu", 0, -1)
    return [json.loads(item) for item in raw]


def test_post_json_answers_202_with_location_and_enqueues_by_id(client: FlaskClient, local_settings: Settings) -> None:
    response = client.post(
        "/v1/jobs",
        json={"question": QUESTION, "videos": [{"url": "https://93.184.215.14/a.mp4"}], "sampling": {"num_frames": 6}},
    )
    assert response.status_code == 202
    job = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["request"]["videos"] == [{"kind": "http", "location": "https://93.184.215.14/a.mp4", "filename": None}]
    messages = _queued_messages(local_settings)
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == "videoqa.ingest"
    assert messages[0]["content-type"] == "application/json"
    # Only the id travels through the broker.
    assert job["id"] in messages[0]["body"] or job["id"] in str(messages[0]["headers"]["argsrepr"])
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["status"] == "queued"


def test_multipart_uploads_are_stored_and_referenced(client: FlaskClient, local_settings: Settings) -> None:
    response = client.post(
        "/v1/jobs",
        data={
            "question": QUESTION,
            "num_frames": "4",
            "max_new_tokens": "20",
            "videos": [(io.BytesIO(b"first"), "a.mp4"), (io.BytesIO(b"second"), "b b.mp4")],
        },
        content_type="multipart/form-data",
    )
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    videos = job["request"]["videos"]
    assert [v["kind"] for v in videos] == ["upload", "upload"]
    assert job["request"]["sampling"]["num_frames"] == 4
    assert job["request"]["generation"]["max_new_tokens"] == 20
    root = Path(local_settings.storage_url)
    assert (root / videos[0]["location"]).read_bytes() == b"first"
    assert (root / videos[1]["location"]).read_bytes() == b"second"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"videos": [{"url": "https://93.184.215.14/a.mp4"}]}, "question"),
        ({"question": "  ", "videos": [{"url": "https://93.184.215.14/a.mp4"}]}, "question"),
        ({"question": QUESTION, "videos": [{"url": "ftp://example.com/a.mp4"}]}, "videos.0.url"),
        (
            {"question": QUESTION, "videos": [{"url": "https://93.184.215.14/a.mp4"}], "sampling": {"num_frames": 0}},
            "sampling.num_frames",
        ),
        (
            {
                "question": QUESTION,
                "videos": [{"url": "https://93.184.215.14/a.mp4"}],
                "sampling": {"num_frames": 10000},
            },
            "sampling.num_frames",
        ),
        (
            {
                "question": QUESTION,
                "videos": [{"url": "https://93.184.215.14/a.mp4"}],
                "sampling": {"num_frames": "six"},
            },
            "sampling.num_frames",
        ),
        ({"question": QUESTION, "videos": [{"url": "https://93.184.215.14/a.mp4"}], "colour": "red"}, "colour"),
        ({"question": QUESTION, "videos": [{"url": "https://93.184.215.14/a.mp4"}] * 9}, "videos"),
        ({"question": QUESTION}, "videos"),
        (
            {"question": QUESTION, "videos": [{"url": "https://93.184.215.14/a.mp4"}], "prompt": "no placeholder"},
            "prompt",
        ),
        (
            {"question": QUESTION, "videos": [{"url": "https://93.184.215.14/a.mp4"}], "generation": {"top_p": 2}},
            "generation.top_p",
        ),
    ],
)
def test_bad_requests_get_400_naming_the_field(
    client: FlaskClient, local_settings: Settings, body: dict, field: str
) -> None:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert field in [problem["field"] for problem in error["details"]]
    assert field in error["message"]
    assert _queued_messages(local_settings) == []


def test_malformed_json_and_wrong_content_types(client: FlaskClient) -> None:
    response = client.post("/v1/jobs", data="{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["message"] == "the body is not valid JSON"
    response = client.post("/v1/jobs", json=["a", "list"])
    assert response.status_code == 400
    response = client.post("/v1/jobs", data="question=x", content_type="text/plain")
    assert response.status_code == 400
    assert "unsupported content type" in response.get_json()["error"]["message"]


def test_unknown_multipart_fields_and_empty_files(client: FlaskClient) -> None:
    response = client.post(
        "/v1/jobs", data={"question": QUESTION, "frames": "3", "videos": [(io.BytesIO(b"x"), "a.mp4")]},
        content_type="multipart/form-data",
    )  # fmt: skip
    assert response.status_code == 400
    assert response.get_json()["error"]["details"] == [
        {"field": "frames", "message": "unknown field; did you mean `num_frames`?"}
    ]
    response = client.post(
        "/v1/jobs",
        data={"question": QUESTION, "videos": [(io.BytesIO(b""), "a.mp4")]},
        content_type="multipart/form-data",
    )
    assert response.status_code == 400
    assert "empty" in response.get_json()["error"]["message"]


def test_body_over_the_upload_limit_is_413(spare_redis_url: str, tmp_path: Path) -> None:
    settings = load_settings(
        {"VIDEOQA_REDIS_URL": spare_redis_url, "VIDEOQA_STORAGE_URL": str(tmp_path), "VIDEOQA_MAX_UPLOAD_BYTES": "1000"}
    )
    client = create_app(settings).test_client()
    response = client.post(
        "/v1/jobs",
        data={"question": QUESTION, "videos": [(io.BytesIO(b"x" * 5000), "a.mp4")]},
        content_type="multipart/form-data",
    )
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "request_entity_too_large"


def test_unknown_job_is_404_with_a_json_error(client: FlaskClient) -> None:
    for response in (client.get("/v1/jobs/nope"), client.delete("/v1/jobs/nope")):
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "not_found"
    assert client.get("/no/such/route").get_json()["error"]["code"] == "not_found"


def test_cancel_a_queued_job_then_cancel_again_is_409(client: FlaskClient) -> None:
    job = client.post(
        "/v1/jobs", json={"question": QUESTION, "videos": [{"url": "https://93.184.215.14/a.mp4"}]}
    ).get_json()
    response = client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 200
    assert response.get_json()["status"] == "cancelled"
    again = client.delete(f"/v1/jobs/{job['id']}")
    assert again.status_code == 409
    assert again.get_json()["error"]["code"] == "conflict"


def test_list_jobs_newest_first_with_a_cursor(client: FlaskClient) -> None:
    ids = [
        client.post(
            "/v1/jobs", json={"question": f"{QUESTION} {n}", "videos": [{"url": "https://93.184.215.14/a.mp4"}]}
        ).get_json()["id"]
        for n in range(3)
    ]
    page = client.get("/v1/jobs?limit=2").get_json()
    assert [job["id"] for job in page["jobs"]] == ids[::-1][:2]
    rest = client.get(f"/v1/jobs?limit=2&before={page['next_before']}").get_json()
    assert [job["id"] for job in rest["jobs"]] == ids[:1]
    assert rest["next_before"] is None
    assert client.get("/v1/jobs?limit=0").status_code == 400


def test_healthz(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_the_api_process_loads_no_worker_code(local_settings: Settings) -> None:
    """The API enqueues by task name: torch, transformers and PyAV stay out of its processes."""
    code = (
        "import sys; from api.app import create_app; from common.settings import load_settings; "
        f"create_app(load_settings({{'VIDEOQA_REDIS_URL': {local_settings.redis_url!r}, "
        f"'VIDEOQA_STORAGE_URL': {local_settings.storage_url!r}}})); "
        "print(sorted({'torch', 'transformers', 'av', 'worker'} & set(sys.modules)))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_a_job_past_retention_is_404_not_pending(client: FlaskClient, local_settings: Settings) -> None:
    import time

    from common.connections import redis_client
    from common.jobs import JobStore

    short_lived = JobStore(redis_client(local_settings), ttl_s=1).create({"question": "q"})
    assert client.get(f"/v1/jobs/{short_lived.id}").status_code == 200
    time.sleep(1.5)
    response = client.get(f"/v1/jobs/{short_lived.id}")
    assert response.status_code == 404
    assert "past retention" in response.get_json()["error"]["message"]
    assert short_lived.id not in [job["id"] for job in client.get("/v1/jobs").get_json()["jobs"]]
