"""Stored videos without workers: request validation, the video records' rules in real Redis, and
the API's answers (through ``create_app`` and its test client) before any frame is sampled."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from pydantic import ValidationError

from api.app import create_app
from common.api_keys import hash_key
from common.jobs import JobStore
from common.schemas import JobRequest, MediaInput, VideoRequest, check_limits
from common.settings import load_settings
from common.storage import StoredObject
from common.videos import CLAIM_SETTLE_S, VideoInUse, VideoStore
from worker.cpu.sweeper import UPLOAD_GRACE_S, expired

KEY_A = "vqa_key_of_tenant_a_0123456789"
KEY_B = "vqa_key_of_tenant_b_9876543210"
VIDEO_ID = "0123456789abcdef0123456789abcdef"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def client(spare_redis_url: str, tmp_path: Path) -> FlaskClient:
    settings = load_settings(
        {
            "VIDEOQA_REDIS_URL": spare_redis_url,
            "VIDEOQA_STORAGE_URL": str(tmp_path / "store"),
            "VIDEOQA_API_KEYS": f"acme:{hash_key(KEY_A)},beta:{hash_key(KEY_B)}",
        }
    )
    return create_app(settings).test_client()


def _upload(client: FlaskClient, key: str = KEY_A, **fields: str) -> dict:
    data = {"video": (io.BytesIO(b"not decoded here: no worker runs"), "clip.mp4"), **fields}
    response = client.post("/v1/videos", data=data, content_type="multipart/form-data", headers=_auth(key))
    assert response.status_code == 202, response.get_json()
    assert response.headers["Location"] == f"/v1/videos/{response.get_json()['id']}"
    return response.get_json()


# -- the models ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "give exactly one of url and video_id"),
        ({"url": "https://a/v.mp4", "video_id": VIDEO_ID}, "give exactly one of url and video_id"),
        ({"video_id": "../../etc"}, "is not a video id"),
        ({"video_id": VIDEO_ID.upper()}, "is not a video id"),
        ({"url": "ftp://a/v.mp4"}, "must be an http://, https:// or s3:// URL"),
    ],
)
def test_media_names_exactly_one_source(body: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MediaInput.model_validate(body)
    assert MediaInput.model_validate({"video_id": VIDEO_ID}).video_id == VIDEO_ID


def test_images_take_urls_and_a_follow_up_names_no_media() -> None:
    with pytest.raises(ValidationError, match="images take a url"):
        JobRequest.model_validate({"question": "q", "images": [{"video_id": VIDEO_ID}]})
    with pytest.raises(ValidationError, match="give no videos, images"):
        JobRequest.model_validate({"question": "q", "parent": "abc", "videos": [{"url": "https://a/v.mp4"}]})
    assert JobRequest.model_validate({"question": "q", "parent": "abc"}).parent == "abc"
    with pytest.raises(ValidationError, match="must be an http"):
        VideoRequest.model_validate({"url": "file:///etc/passwd"})


# -- the records in Redis -----------------------------------------------------------------------


def test_a_video_in_use_by_a_live_job_is_not_deleted(spare_redis_url: str) -> None:
    client = redis.Redis.from_url(spare_redis_url, decode_responses=True)
    videos, jobs = VideoStore(client, ttl_s=600), JobStore(client, ttl_s=600)
    video = videos.create({"kind": "upload", "location": "uploads/x/v"}, {"num_frames": 2}, tenant="acme")
    assert videos.claim(video.id, "acme", "job-1").status == "processing"
    frames = [{"index": 0, "time": 0.0, "key": f"videos/{video.id}/0000.png"}]
    assert videos.mark_ready(video.id, frames, frame_count=10, duration=0.3)
    assert not videos.mark_ready(video.id, frames, frame_count=10, duration=0.3)  # ready once
    assert videos.claim(video.id, "beta", "job-1").status == "missing"  # another tenant's

    job = jobs.create({}, tenant="acme")
    claimed = videos.claim(video.id, "acme", job.id)
    assert (claimed.status, claimed.frames) == ("ready", frames)
    with pytest.raises(VideoInUse) as refused:
        videos.delete(video.id, "acme")
    assert refused.value.job_id == job.id
    assert not videos.delete(video.id, "beta")

    # A claim by a job whose record does not exist yet holds the video for a while.
    videos.claim(video.id, "acme", "not-created-yet")
    jobs.cancel(job.id)
    with pytest.raises(VideoInUse):
        videos.delete(video.id, "acme")
    client.zadd(f"videoqa:video-jobs:{video.id}", {"not-created-yet": time.time() - CLAIM_SETTLE_S - 1})
    assert videos.delete(video.id, "acme")
    assert videos.get(video.id) is None and videos.list(tenant="acme", limit=10) == []
    assert videos.claim(video.id, "acme", "job-2").status == "missing"


def test_the_sweeper_keeps_a_stored_videos_objects_while_its_record_exists() -> None:
    now = time.time()
    old = now - UPLOAD_GRACE_S - 1
    objects = [
        StoredObject(f"videos/{'a' * 32}/0000.png", old),
        StoredObject(f"uploads/{'a' * 32}/video-0-clip.mp4", old),
        StoredObject(f"videos/{'b' * 32}/0000.png", old),
        StoredObject(f"uploads/{'b' * 32}/video-0-clip.mp4", old),
        StoredObject(f"videos/{'c' * 32}/0000.png", now),  # just written: its record may be new
    ]
    gone = list(expired(objects, live={}, retention_s=10 * UPLOAD_GRACE_S, now=now, videos={"a" * 32}))
    assert gone == [f"videos/{'b' * 32}/0000.png", f"uploads/{'b' * 32}/video-0-clip.mp4"]


# -- the API ------------------------------------------------------------------------------------


def test_a_new_video_is_processing_and_only_its_tenant_sees_it(client: FlaskClient) -> None:
    video = _upload(client, num_frames="4")
    assert video["status"] == "processing"
    assert video["sampling"]["num_frames"] == 4
    assert video["source"] == {"kind": "upload", "filename": "clip.mp4"}
    assert video["expires_at"] > video["created_at"]
    assert video["frames"] == [] and video["error"] is None

    own = client.get(f"/v1/videos/{video['id']}", headers=_auth(KEY_A))
    assert own.status_code == 200 and own.get_json()["id"] == video["id"]
    for path in (f"/v1/videos/{video['id']}", f"/v1/videos/{video['id']}/frames/0"):
        other = client.get(path, headers=_auth(KEY_B))
        assert other.status_code == 404 and other.get_json()["error"]["code"] == "not_found"
    assert client.delete(f"/v1/videos/{video['id']}", headers=_auth(KEY_B)).status_code == 404
    assert [v["id"] for v in client.get("/v1/videos", headers=_auth(KEY_A)).get_json()["videos"]] == [video["id"]]
    assert client.get("/v1/videos", headers=_auth(KEY_B)).get_json()["videos"] == []
    frame = client.get(f"/v1/videos/{video['id']}/frames/0", headers=_auth(KEY_A))
    assert frame.status_code == 404 and "processing" in frame.get_json()["error"]["message"]

    # A job cannot use it yet; another tenant's job cannot find it at all.
    job = {"question": "q", "videos": [{"video_id": video["id"]}]}
    not_ready = client.post("/v1/jobs", json=job, headers=_auth(KEY_A))
    assert not_ready.status_code == 400, not_ready.get_json()
    assert not_ready.get_json()["error"]["code"] == "video_not_ready"
    assert not_ready.get_json()["error"]["details"][0]["field"] == "videos.0.video_id"
    assert client.post("/v1/jobs", json=job, headers=_auth(KEY_B)).status_code == 404

    # Deleting it (no job uses it) removes the record and the uploaded file.
    assert client.delete(f"/v1/videos/{video['id']}", headers=_auth(KEY_A)).status_code == 204
    assert client.get(f"/v1/videos/{video['id']}", headers=_auth(KEY_A)).status_code == 404
    assert client.delete(f"/v1/videos/{video['id']}", headers=_auth(KEY_A)).status_code == 404
    store = client.application.extensions["videoqa"].store
    assert list(store.list_objects(f"uploads/{video['id']}/")) == []


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"data": {}, "content_type": "multipart/form-data"}, "video"),
        ({"data": {"video": [(io.BytesIO(b"a"), "a.mp4"), (io.BytesIO(b"b"), "b.mp4")]}}, "video"),
        ({"data": {"video": (io.BytesIO(b"a"), "a.mp4"), "frames": "4"}}, "frames"),
        ({"data": {"video": (io.BytesIO(b"a"), "a.mp4"), "num_frames": "0"}}, "num_frames"),
        ({"data": {"video": (io.BytesIO(b"a"), "a.mp4"), "num_frames": "1000"}}, "num_frames"),
        ({"data": {"video": (io.BytesIO(b""), "empty.mp4")}}, "video[0]"),
        ({"json": {"url": "http://10.0.0.1/v.mp4"}}, "url"),
        ({"json": {"url": "s3://bucket/v.mp4"}}, "url"),
        ({"json": {"url": "https://93.184.215.14/v.mp4", "num_frames": 4}}, "num_frames"),
        ({"json": {"url": "https://93.184.215.14/v.mp4", "sampling": {"end": -1}}}, "sampling.end"),
    ],
)
def test_bad_video_submissions_are_400_naming_the_field(client: FlaskClient, request_kwargs: dict, field: str) -> None:
    response = client.post("/v1/videos", headers=_auth(KEY_A), **request_kwargs)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert field in [detail["field"] for detail in error["details"]], error
    assert client.get("/v1/videos", headers=_auth(KEY_A)).get_json()["videos"] == []


def test_bad_ids_are_404_or_400(client: FlaskClient) -> None:
    for path in (
        "/v1/videos/nope",
        f"/v1/videos/{VIDEO_ID}",
        f"/v1/videos/{VIDEO_ID}/frames/0",
        "/v1/videos/x/frames/-1",
    ):
        response = client.get(path, headers=_auth(KEY_A))
        assert response.status_code == 404, path
        assert response.get_json()["error"]["code"] == "not_found"
    unknown = client.post("/v1/jobs", json={"question": "q", "videos": [{"video_id": VIDEO_ID}]}, headers=_auth(KEY_A))
    assert unknown.status_code == 404
    assert unknown.get_json()["error"]["details"] == [
        {"field": "videos.0.video_id", "message": f"no video {VIDEO_ID!r} (unknown, deleted, or past retention)"}
    ]
    malformed = client.post("/v1/jobs", json={"question": "q", "videos": [{"video_id": "x"}]}, headers=_auth(KEY_A))
    assert malformed.status_code == 400
    assert malformed.get_json()["error"]["details"][0]["field"] == "videos.0.video_id"
    conflicting = {"url": "https://93.184.215.14/v.mp4", "video_id": VIDEO_ID}
    both = client.post("/v1/jobs", json={"question": "q", "videos": [conflicting]}, headers=_auth(KEY_A))
    assert both.status_code == 400
    assert "exactly one of url and video_id" in both.get_json()["error"]["message"]
    assert client.get("/v1/videos?limit=0", headers=_auth(KEY_A)).status_code == 400
    assert client.get("/v1/videos/x?wait=99", headers=_auth(KEY_A)).status_code == 400


def test_a_follow_up_needs_a_succeeded_job_of_the_same_tenant(client: FlaskClient) -> None:
    created = client.post("/v1/jobs", json={"question": "q", "videos": [{"url": "https://93.184.215.14/v.mp4"}]}, headers=_auth(KEY_A))  # fmt: skip
    parent = created.get_json()["id"]
    running = client.post("/v1/jobs", json={"question": "and?", "parent": parent}, headers=_auth(KEY_A))
    assert running.status_code == 409
    assert running.get_json()["error"] == {
        "code": "parent_not_usable",
        "message": f"job {parent} is queued: ask the follow-up once it succeeded",
        "details": [{"field": "parent", "message": f"job {parent} is queued: ask the follow-up once it succeeded"}],
    }
    assert client.post("/v1/jobs", json={"question": "and?", "parent": parent}, headers=_auth(KEY_B)).status_code == 404
    client.delete(f"/v1/jobs/{parent}", headers=_auth(KEY_A))
    cancelled = client.post("/v1/jobs", json={"question": "and?", "parent": parent}, headers=_auth(KEY_A))
    assert cancelled.status_code == 409 and "ended as cancelled" in cancelled.get_json()["error"]["message"]
    assert client.post("/v1/jobs", json={"question": "and?", "parent": "nope"}, headers=_auth(KEY_A)).status_code == 404


def test_idempotent_video_submission_answers_the_first_video(client: FlaskClient) -> None:
    body = {"url": "https://93.184.215.14/v.mp4", "sampling": {"num_frames": 3}}
    headers = {**_auth(KEY_A), "Idempotency-Key": "video-1"}
    first = client.post("/v1/videos", json=body, headers=headers)
    again = client.post("/v1/videos", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = client.post("/v1/videos", json={**body, "sampling": {"num_frames": 4}}, headers=headers)
    assert other.status_code == 422
    assert first.get_json()["source"] == {"kind": "http", "url": body["url"]}


def test_a_jobs_size_counts_the_frames_its_stored_videos_hold() -> None:
    settings = load_settings({"VIDEOQA_MAX_FRAMES": "32"})
    by_url = JobRequest.model_validate(
        {"question": "q", "videos": [{"url": "https://a/v.mp4"}] * 8, "sampling": {"num_frames": 32}}
    )
    by_id = JobRequest.model_validate(
        {"question": "q", "videos": [{"video_id": VIDEO_ID}] * 8, "sampling": {"num_frames": 32}}
    )
    assert [p["field"] for p in check_limits(by_url, settings)] == ["size"]
    # Stored videos count what they hold, not the job's num_frames.
    assert check_limits(by_id, settings, stored_frames=8 * 2) == []
    assert [p["field"] for p in check_limits(by_id, settings, stored_frames=8 * 32)] == ["size"]
    follow_up = JobRequest.model_validate({"question": "q", "parent": VIDEO_ID})
    assert check_limits(follow_up, settings, stored_frames=4) == []


def test_a_processing_video_without_a_message_is_sent_again(spare_redis_url: str) -> None:
    from common.celery_config import make_celery
    from worker.app.video_reconciler import reconcile_videos

    settings = load_settings({"VIDEOQA_REDIS_URL": spare_redis_url})
    client = redis.Redis.from_url(spare_redis_url, decode_responses=True)
    videos = VideoStore(client, ttl_s=600)
    lost, queued, ready = (videos.create({"kind": "s3", "location": "s3://b/k"}, {}) for _ in range(3))
    make_celery(settings).send_task("videoqa.ingest_video", args=[queued.id])
    videos.mark_ready(ready.id, [], frame_count=1, duration=0.0)
    sent: list[tuple[str, str]] = []
    later = time.time() + 120

    assert reconcile_videos(client, videos, lambda *a: sent.append(a), stale_after_s=60) == []  # not stale yet
    assert reconcile_videos(client, videos, lambda *a: sent.append(a), stale_after_s=60, now=later) == [lost.id]
    assert sent == [("videoqa.ingest_video", lost.id)]
    # Sent again: its record changed then, so a scan within stale_after_s of that leaves it.
    assert reconcile_videos(client, videos, lambda *a: sent.append(a), stale_after_s=60, now=time.time() + 30) == []
    assert client.smembers("videoqa:video-processing") == {lost.id, queued.id}
