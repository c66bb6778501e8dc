"""Stored videos through the real parts: gunicorn API, Redis, Celery CPU and GPU workers, moto's S3
server over HTTP. Ingest once, ask many: jobs by ``video_id`` skip the CPU stage and answer as the
same job by URL does."""

from __future__ import annotations

import functools
import http.server
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import BUCKET, RunningService
from tests.test_openapi import _conforms

QUESTIONS = ("What is the cat doing?", "Is it the same cat in every frame?")
SAMPLING = {"num_frames": 4}
GENERATION = {"max_new_tokens": 12}


def _post(service: RunningService, path: str, expected: int = 202, **kwargs: Any) -> dict[str, Any]:
    response = requests.post(service.url(path), timeout=30, **kwargs)
    assert response.status_code == expected, response.text
    return response.json()


def _ready(service: RunningService, video_id: str, timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        video = requests.get(service.url(f"/v1/videos/{video_id}?wait=20"), timeout=30).json()
        if video["status"] != "processing" or time.monotonic() > deadline:
            assert video["status"] == "ready", (video, service.tail_logs())
            return video


def _ask(service: RunningService, videos: list[dict[str, str]], question: str) -> dict[str, Any]:
    return _post(
        service,
        "/v1/jobs",
        json={"question": question, "videos": videos, "sampling": SAMPLING, "generation": GENERATION},
    )


def _succeeded(service: RunningService, job_id: str) -> dict[str, Any]:
    job = service.wait(job_id)
    assert job["status"] == "succeeded", (job["error"], service.tail_logs())
    return job


def _frames(job: dict[str, Any]) -> list[tuple[int, int, float]]:
    return [(f["video"], f["index"], f["time"]) for f in job["result"]["frames"]]


def _stored_png(s3, key: str) -> np.ndarray:
    body = s3.get_object(Bucket=BUCKET, Key=f"service/{key}")["Body"].read()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def test_ingest_once_then_jobs_by_video_id_answer_as_jobs_by_url(
    service: RunningService, s3, sample_videos: list[Path]
) -> None:
    s3.upload_file(str(sample_videos[0]), BUCKET, "inputs/stored-cats_1.mp4")
    url = f"s3://{BUCKET}/inputs/stored-cats_1.mp4"
    created = requests.post(service.url("/v1/videos"), json={"url": url, "sampling": SAMPLING}, timeout=30)
    assert created.status_code == 202, created.text
    assert created.headers["Location"] == f"/v1/videos/{created.json()['id']}"
    assert created.json()["status"] == "processing"
    video = _ready(service, created.json()["id"])
    assert video["frame_count"] == 120
    assert video["duration"] == pytest.approx(119 / 30)
    assert [(f["n"], f["index"]) for f in video["frames"]] == [(0, 0), (1, 30), (2, 60), (3, 90)]
    assert [f["time"] for f in video["frames"]] == pytest.approx([0, 1, 2, 3])
    assert video["sampling"]["num_frames"] == 4 and video["source"] == {"kind": "s3", "url": url}
    page = requests.get(service.url("/v1/videos"), timeout=10).json()
    assert video["id"] in [v["id"] for v in page["videos"]]
    spec = requests.get(service.url("/openapi.json"), timeout=10).json()
    _conforms(spec, "VideoView", video)
    _conforms(spec, "VideoPage", page)

    by_url = [_succeeded(service, _ask(service, [{"url": url}], question)["id"]) for question in QUESTIONS]
    submitted = [_ask(service, [{"video_id": video["id"]}], question) for question in QUESTIONS]
    # No CPU stage: the jobs wait for a GPU from the start, their media already named.
    assert [job["status"] for job in submitted] == ["queued_gpu", "queued_gpu"]
    by_id = [_succeeded(service, job["id"]) for job in submitted]
    for url_job, id_job in zip(by_url, by_id, strict=True):
        _conforms(spec, "JobView", id_job)
        assert id_job["result"]["answer"] == url_job["result"]["answer"]
        assert _frames(id_job) == _frames(url_job) == [(0, f["index"], f["time"]) for f in video["frames"]]
        # The same frames: the GPU worker's prefix cache may serve the later job's visual prefix,
        # so only the tokens counted must agree, not the cached ones.
        uncached = ("prompt_tokens", "completion_tokens")
        assert [id_job["result"]["usage"][n] for n in uncached] == [url_job["result"]["usage"][n] for n in uncached]
        # Nothing was fetched or decoded for them: no ingest stage ran, no download or decode time.
        assert "ingest" not in id_job["stages"] and "ingest" in url_job["stages"]
        assert not {"download", "decode", "store_frames", "ingest"} & set(id_job["result"]["timings"])
        assert id_job["request"]["videos"] == [{"kind": "video", "location": video["id"], "filename": None}]
        events = requests.get(service.url(f"/v1/jobs/{id_job['id']}/events"), timeout=30).text
        assert "ingesting" not in events and "queued_gpu" in events

    # The frames endpoint serves the frames the model saw: those of the URL job, pixel for pixel.
    url_job_frames = _media_keys(service, by_url[0]["id"])
    for n, key in enumerate(url_job_frames):
        frame = requests.get(service.url(f"/v1/videos/{video['id']}/frames/{n}"), timeout=10)
        assert frame.status_code == 200
        assert frame.headers["Content-Type"] == "image/png"
        assert frame.headers["Cache-Control"].startswith("private, max-age=")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(frame.content)).convert("RGB")), _stored_png(s3, key))
        again = requests.get(
            service.url(frame.request.path_url), headers={"If-None-Match": frame.headers["ETag"]}, timeout=10
        )
        assert again.status_code == 304
    assert requests.get(service.url(f"/v1/videos/{video['id']}/frames/4"), timeout=10).status_code == 404

    # A follow-up asks over its parent's media, with no CPU stage either.
    parent = by_id[0]
    follow_up = _post(
        service, "/v1/jobs", json={"question": "And then?", "parent": parent["id"], "generation": GENERATION}
    )
    assert follow_up["status"] == "queued_gpu"
    assert follow_up["request"]["parent"] == parent["id"]
    assert follow_up["request"]["videos"] == parent["request"]["videos"]
    done = _succeeded(service, follow_up["id"])
    assert _frames(done) == _frames(parent) and "ingest" not in done["stages"]
    # It continues the conversation: the parent's question, where its video went, and its answer.
    assert done["request"]["history"] == [
        {"role": "user", "content": f"<video>\n{QUESTIONS[0]}"},
        {"role": "assistant", "content": parent["result"]["answer"]},
    ]
    # The same turns sent by hand, over the same stored video, give the same answer.
    by_hand = {"question": "And then?", "videos": [{"video_id": video["id"]}], "history": done["request"]["history"],
               "generation": GENERATION}  # fmt: skip
    assert (
        _succeeded(service, _post(service, "/v1/jobs", json=by_hand)["id"])["result"]["answer"]
        == done["result"]["answer"]
    )
    # A follow-up of a follow-up works the same way.
    assert _succeeded(service, _post(service, "/v1/jobs", json={"question": "Why?", "parent": done["id"]})["id"])


def _media_keys(service: RunningService, job_id: str) -> list[str]:
    from common.connections import redis_client
    from common.jobs import JobStore

    job = JobStore(redis_client(service.settings), ttl_s=60).get(job_id)
    assert job is not None and job.media is not None
    return [frame["key"] for frame in job.media[0]["frames"]]


@pytest.fixture()
def held_server(sample_videos: list[Path]) -> Iterator[tuple[str, threading.Event]]:
    """Serves the sample videos only once the test sets the event: a job downloading from it stays
    in its CPU stage until then."""
    release = threading.Event()

    class Held(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            release.wait(60)
            super().do_GET()

    handler = functools.partial(Held, directory=str(sample_videos[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", release
    release.set()
    server.shutdown()


def test_an_uploaded_video_is_kept_until_deleted_and_not_while_a_job_uses_it(
    service: RunningService, s3, sample_videos: list[Path], held_server: tuple[str, threading.Event]
) -> None:
    with open(sample_videos[1], "rb") as handle:
        created = _post(
            service, "/v1/videos", files={"video": ("cats_2.mp4", handle, "video/mp4")}, data={"num_frames": "3"}
        )
    assert created["source"] == {"kind": "upload", "filename": "cats_2.mp4"}
    video = _ready(service, created["id"])
    assert [f["index"] for f in video["frames"]] == [0, 40, 80]
    prefix = f"service/videos/{video['id']}/"
    assert len(s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])) == 3
    # The uploaded file served its purpose once the frames were stored.
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"service/uploads/{video['id']}/").get("KeyCount") == 0

    # A job with the stored video and a URL: the CPU stage fetches the URL (held here) and takes
    # the stored frames as they are.
    base, release = held_server
    job = _ask(service, [{"video_id": video["id"]}, {"url": f"{base}/cats_1.mp4"}], "Same cat?")
    refused = requests.delete(service.url(f"/v1/videos/{video['id']}"), timeout=10)
    assert refused.status_code == 409
    assert refused.json()["error"] == {
        "code": "video_in_use",
        "message": f"video {video['id']} is used by job {job['id']}, which has not ended; delete the video once "
        "it has (or cancel the job first)",
    }
    release.set()
    done = _succeeded(service, job["id"])
    # The stored video keeps the sampling it was stored with (3 frames); the URL takes the job's (4).
    assert [(f["video"], f["index"]) for f in done["result"]["frames"]] == [
        (0, 0), (0, 40), (0, 80), (1, 0), (1, 30), (1, 60), (1, 90)
    ]  # fmt: skip
    assert "ingest" in done["stages"]

    assert requests.delete(service.url(f"/v1/videos/{video['id']}"), timeout=10).status_code == 204
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount") == 0
    for path in (f"/v1/videos/{video['id']}", f"/v1/videos/{video['id']}/frames/0"):
        assert requests.get(service.url(path), timeout=10).status_code == 404
    gone = requests.post(
        service.url("/v1/jobs"), json={"question": "?", "videos": [{"video_id": video["id"]}]}, timeout=10
    )
    assert gone.status_code == 404 and gone.json()["error"]["details"][0]["field"] == "videos.0.video_id"
    # A follow-up of a job whose stored video is gone is refused, not failed later.
    orphan = requests.post(service.url("/v1/jobs"), json={"question": "?", "parent": job["id"]}, timeout=10)
    assert orphan.status_code == 409 and orphan.json()["error"]["code"] == "parent_not_usable"


def test_a_video_that_cannot_be_decoded_fails_and_jobs_are_told_why(service: RunningService) -> None:
    created = _post(
        service, "/v1/videos", files={"video": ("holiday.mp4", io.BytesIO(b"not a video " * 200), "video/mp4")}
    )
    deadline = time.monotonic() + 120
    video = created
    while video["status"] == "processing" and time.monotonic() < deadline:
        video = requests.get(service.url(f"/v1/videos/{created['id']}?wait=20"), timeout=30).json()
    assert video["status"] == "failed"
    assert video["error"]["code"] == "invalid_media" and video["frames"] == []
    job = requests.post(
        service.url("/v1/jobs"), json={"question": "?", "videos": [{"video_id": video["id"]}]}, timeout=10
    )
    assert job.status_code == 400
    assert job.json()["error"]["code"] == "video_not_ready"
    assert job.json()["error"]["message"].startswith(
        f"video {video['id']} failed (invalid_media): not a readable media file"
    )


def test_another_tenants_video_is_404_everywhere(service: RunningService, sample_videos: list[Path]) -> None:
    """A video stored with an API key (an API process of its own on the same Redis, storage and
    workers) is invisible to the service's keyless tenant."""
    from api.app import create_app
    from common.api_keys import hash_key
    from common.settings import load_settings

    key = "vqa_key_of_tenant_acme_012345"
    keyed = create_app(load_settings({**service.env, "VIDEOQA_API_KEYS": f"acme:{hash_key(key)}"})).test_client()
    auth = {"Authorization": f"Bearer {key}"}
    with open(sample_videos[0], "rb") as handle:
        created = keyed.post("/v1/videos", data={"video": (handle, "cats_1.mp4"), "num_frames": "2"}, headers=auth)
    assert created.status_code == 202, created.get_json()
    video_id = created.get_json()["id"]
    deadline = time.monotonic() + 180
    while (video := keyed.get(f"/v1/videos/{video_id}?wait=20", headers=auth).get_json())["status"] == "processing":
        assert time.monotonic() < deadline, service.tail_logs()
    assert video["status"] == "ready"

    for path in (f"/v1/videos/{video_id}", f"/v1/videos/{video_id}/frames/0"):
        assert requests.get(service.url(path), timeout=10).status_code == 404
    assert requests.delete(service.url(f"/v1/videos/{video_id}"), timeout=10).status_code == 404
    assert video_id not in [v["id"] for v in requests.get(service.url("/v1/videos"), timeout=10).json()["videos"]]
    job = requests.post(service.url("/v1/jobs"), json={"question": "?", "videos": [{"video_id": video_id}]}, timeout=10)
    assert job.status_code == 404 and job.json()["error"]["code"] == "not_found"
    assert keyed.get(f"/v1/videos/{video_id}/frames/1", headers=auth).status_code == 200
    assert keyed.delete(f"/v1/videos/{video_id}", headers=auth).status_code == 204


def test_the_python_client_stores_a_video_asks_and_follows_up(
    service: RunningService, sample_videos: list[Path]
) -> None:
    client = service.client
    stored = client.store_video(sample_videos[1], sampling={"num_frames": 2})
    assert stored.status == "processing"
    ready = client.wait_video(stored.id, timeout=180)
    assert ready.status == "ready", (ready.error, service.tail_logs())
    assert [frame.index for frame in ready.frames] == [0, 60] and ready.frame_count == 120
    first = client.ask([ready.ref], "What is the cat doing?", generation=GENERATION, timeout=120)
    assert [(frame.video, frame.index) for frame in first.frames] == [(0, 0), (0, 60)]
    follow_up = client.ask([], "And then?", parent=first.job_id, generation=GENERATION, timeout=120)
    assert [frame.index for frame in follow_up.frames] == [0, 60]
    assert "ingest" not in client.get(follow_up.job_id).raw["stages"]
    client.delete_video(stored.id)
    assert requests.get(service.url(f"/v1/videos/{stored.id}"), timeout=10).status_code == 404


def test_a_chat_completion_names_a_stored_video_by_its_videoqa_url(
    service: RunningService, sample_videos: list[Path]
) -> None:
    with open(sample_videos[0], "rb") as handle:
        created = _post(
            service, "/v1/videos", files={"video": ("cats_1.mp4", handle, "video/mp4")}, data={"num_frames": "2"}
        )
    video = _ready(service, created["id"])
    model = requests.get(service.url("/v1/models"), timeout=10).json()["data"][0]["id"]
    part = {"type": "video_url", "video_url": {"url": f"videoqa://videos/{video['id']}"}}
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}],
        "max_tokens": 8,
    }
    response = requests.post(service.url("/v1/chat/completions"), json=chat, timeout=120)
    assert response.status_code == 200, response.text
    job = service.wait(response.headers["X-Videoqa-Job-Id"])
    assert job["result"]["answer"] == response.json()["choices"][0]["message"]["content"]
    assert [(f["index"], f["time"]) for f in job["result"]["frames"]] == [
        (f["index"], f["time"]) for f in video["frames"]
    ]
    assert "ingest" not in job["stages"]
    # An unknown video (or another API key's) is not found.
    part["video_url"]["url"] = "videoqa://videos/0123456789abcdef0123456789abcdef"
    assert requests.post(service.url("/v1/chat/completions"), json=chat, timeout=30).status_code == 404
