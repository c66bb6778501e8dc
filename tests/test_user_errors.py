"""Errors in words a user understands: plain validation messages, fields named as sent, the field
probably meant, a status filter on the job list, and timestamps a person can read."""

from __future__ import annotations

import io
import re
import time
from datetime import datetime

import pytest
from flask.testing import FlaskClient

from api.app import create_app
from common.connections import redis_client
from common.jobs import JobStore
from common.settings import Settings

QUESTION = "What is the cat doing?"
VIDEO = {"url": "https://93.184.215.14/a.mp4"}
# What pydantic would say in its own words.
PYDANTIC_WORDING = re.compile(r"Value error|Input should|instance of|Field required|Extra inputs|errors\.pydantic\.dev")


@pytest.fixture()
def client(local_settings: Settings) -> FlaskClient:
    return create_app(local_settings).test_client()


def _details(response) -> dict[str, str]:
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert not PYDANTIC_WORDING.search(str(error)), error
    return {problem["field"]: problem["message"] for problem in error["details"]}


def test_validation_messages_are_plain_words(client: FlaskClient) -> None:
    details = _details(
        client.post(
            "/v1/jobs",
            json={
                "question": "  ",
                "videos": [{"url": "ftp://host/a.mp4"}, "https://example.com/b.mp4", {}],
                "sampling": {"num_frames": "six", "fps": 0},
                "generation": {"top_p": 2, "do_sample": "maybe"},
            },
        )
    )
    assert details == {
        "question": "must not be blank",
        "videos.0.url": "must be an http://, https:// or s3:// URL",
        "videos.1": 'must be an object such as {"url": "https://example.com/video.mp4"}',
        "videos.2": "give exactly one of url and video_id",
        "sampling.num_frames": "must be a whole number",
        "sampling.fps": "must be greater than 0",
        "generation.do_sample": "must be true or false",
        "generation.top_p": "must be at most 1",
    }
    window = _details(
        client.post("/v1/jobs", json={"question": QUESTION, "videos": [VIDEO], "sampling": {"start": 3, "end": 1}})
    )
    assert window == {"sampling": "end must be greater than start"}


def test_unknown_fields_point_at_the_one_meant(client: FlaskClient) -> None:
    details = _details(
        client.post(
            "/v1/jobs",
            json={"question": QUESTION, "video": [VIDEO], "num_frames": 4, "generation": {"temprature": 0.5}},
        )
    )
    assert details == {
        "video": "unknown field; did you mean `videos`?",
        "num_frames": "unknown field; `num_frames` belongs under `sampling`",
        "generation.temprature": "unknown field; did you mean `temperature`?",
    }
    form = {"question": QUESTION, "video": [(io.BytesIO(b"x"), "a.mp4")], "frames": "3", "colour": "red"}
    details = _details(client.post("/v1/jobs", data=form, content_type="multipart/form-data"))
    assert details == {
        "video": "unknown field; did you mean `videos`?",
        "frames": "unknown field; did you mean `num_frames`?",
        "colour": "unknown field",
    }


def test_multipart_errors_name_the_fields_as_sent(client: FlaskClient) -> None:
    def form(**fields: str) -> dict[str, object]:
        return {"question": QUESTION, "videos": [(io.BytesIO(b"video"), "a.mp4")], **fields}

    details = _details(
        client.post("/v1/jobs", data=form(num_frames="0", top_p="2"), content_type="multipart/form-data")
    )
    assert details == {"num_frames": "must be at least 1", "top_p": "must be at most 1"}
    # Limits checked after parsing too.
    details = _details(client.post("/v1/jobs", data=form(max_new_tokens="100000"), content_type="multipart/form-data"))
    assert details["max_new_tokens"] == "at most 512"


def _submit(client: FlaskClient) -> str:
    response = client.post("/v1/jobs", json={"question": QUESTION, "videos": [VIDEO]})
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["id"])


def test_the_job_list_filters_by_status_and_pages_through_the_matches(
    client: FlaskClient, local_settings: Settings
) -> None:
    jobs = JobStore(redis_client(local_settings), ttl_s=local_settings.job_ttl_s)
    ids = [_submit(client) for _ in range(7)]
    # Newest first: ids[6], ids[5], ...; three of them end, in different ways.
    jobs.fail(ids[5], "invalid_media", "not a video")
    jobs.cancel(ids[3])
    jobs.fail(ids[0], "invalid_media", "not a video")

    def page(query: str) -> tuple[list[str], float | None]:
        response = client.get(f"/v1/jobs?{query}")
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        return [job["id"] for job in body["jobs"]], body["next_before"]

    assert page("status=failed")[0] == [ids[5], ids[0]]
    first, cursor = page("status=failed,cancelled&limit=2")
    assert first == [ids[5], ids[3]] and cursor is not None
    assert page(f"status=failed,cancelled&limit=2&before={cursor}")[0] == [ids[0]]
    assert page("status=queued&limit=3")[0] == [ids[6], ids[4], ids[2]]
    assert page("status=succeeded") == ([], None)
    assert len(page("limit=100")[0]) == 7
    response = client.get("/v1/jobs?status=done")
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request" and "succeeded" in error["message"] and "'done'" in error["message"]


def test_job_records_carry_iso_8601_timestamps_next_to_the_epoch(client: FlaskClient) -> None:
    before = time.time()
    job = client.get(f"/v1/jobs/{_submit(client)}").get_json()
    assert before - 1 <= job["created_at"] <= time.time()
    for name in ("created_at", "updated_at"):
        text = job[f"{name}_iso"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text), text
        assert abs(datetime.fromisoformat(text).timestamp() - job[name]) < 0.001
    listed = client.get("/v1/jobs").get_json()["jobs"][0]
    assert listed["created_at_iso"] == job["created_at_iso"]


def test_decoder_errors_read_without_errno_or_worker_paths() -> None:
    import av

    from worker.media.errors import plain_reason

    cases = {
        av.error.FFmpegError(5, "Input/output error", "/tmp/videoqa-x1/video-0.mp4"): "input/output error",
        av.error.InvalidDataError(1094995529, "Invalid data found when processing input", "/tmp/v.mp4"): (
            "its data is damaged or in no format this service reads"
        ),
        OSError("cannot identify image file '/tmp/videoqa-x1/image-0.png'"): "cannot identify image file",
        RuntimeError("decoder state at /tmp/videoqa-x1: 0x1f"): "the decoder failed on it",
        MemoryError(): "it needs more memory to decode than the limit allows",
    }
    for exc, reason in cases.items():
        assert plain_reason(exc) == reason
