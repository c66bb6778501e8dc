"""Whole jobs through the real parts: gunicorn API, Redis, Celery CPU and GPU workers, S3 server."""

from __future__ import annotations

import functools
import http.server
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import redis
import requests
import torch
from PIL import Image

from common.connections import redis_client
from common.jobs import JobStatus, JobStore
from tests.conftest import BUCKET, RunningService, service_env
from worker.app.resources import load_geometry
from worker.cli.stack import Stack, cpu_worker_command, wait_for_workers
from worker.fixtures.synthetic_videos import write_cat_video

QUESTION = "Are these two cats in these two videos doing the same thing?"
torch.set_num_threads(1)


def _submit(service: RunningService, **kwargs: object) -> str:
    response = requests.post(service.url("/v1/jobs"), timeout=30, **kwargs)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _stored_frames(service: RunningService, s3, job_id: str) -> list[list[Image.Image]]:
    """The frames the CPU worker stored for a job, read back from the S3 server."""
    job = JobStore(redis_client(service.settings), ttl_s=60).get(job_id)
    assert job is not None and job.media is not None
    videos = []
    for item in job.media:
        images = []
        for frame in item["frames"]:
            body = s3.get_object(Bucket=BUCKET, Key=f"service/{frame['key']}")["Body"].read()
            images.append(Image.open(io.BytesIO(body)).convert("RGB"))
        videos.append(images)
    return videos


def test_two_video_question_equals_a_direct_generate(
    service: RunningService, s3, sample_videos: list[Path], direct_model
) -> None:
    for path in sample_videos:
        s3.upload_file(str(path), BUCKET, f"inputs/{path.name}")
    job_id = _submit(
        service,
        json={
            "question": QUESTION,
            "videos": [{"url": f"s3://{BUCKET}/inputs/{path.name}"} for path in sample_videos],
            "sampling": {"num_frames": 6},
            "generation": {"max_new_tokens": 40},
        },
    )
    job = service.wait(job_id)
    assert job["status"] == "succeeded", (job["error"], service.tail_logs())
    result = job["result"]
    assert result["model"] == service.env["VIDEOQA_MODEL"]
    assert [(f["video"], f["index"]) for f in result["frames"]] == [(v, i) for v in (0, 1) for i in range(0, 120, 20)]
    assert {"download", "decode", "store_frames", "ingest", "generate", "total"} <= set(result["timings"])

    # The same frames and the prompt the model's own chat template renders, through plain generate.
    model, processor = direct_model
    frames = [image for video in _stored_frames(service, s3, job_id) for image in video]
    assert len(frames) == 12
    messages = [{"role": "user", "content": [{"type": "image"}] * 12 + [{"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=frames, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=40)
    expected = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert result["answer"] == processor.tokenizer.decode(expected, skip_special_tokens=True)
    usage = result["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (inputs["input_ids"].shape[1], len(expected))
    # An earlier job over the same frames leaves their prefix in the GPU worker's cache.
    assert 0 <= usage["cached_tokens"] < usage["prompt_tokens"]


def test_uploaded_video_stores_the_notebook_frames_exactly(
    service: RunningService, s3, tmp_path: Path, tiny_model_dir: Path
) -> None:
    video = write_cat_video(tmp_path / "bframes.mp4", seconds=4, fps=30, gop=30, bframes=2, variant=1)
    with open(video, "rb") as handle:
        job_id = _submit(
            service,
            files=[("videos", ("bframes.mp4", handle, "video/mp4"))],
            data={"question": "What happens?", "num_frames": "6", "max_new_tokens": "5"},
        )
    job = service.wait(job_id)
    assert job["status"] == "succeeded", (job["error"], service.tail_logs())
    assert [f["index"] for f in job["result"]["frames"]] == [0, 20, 40, 60, 80, 100]
    assert [f["time"] for f in job["result"]["frames"]] == pytest.approx([i / 30 for i in range(0, 120, 20)])

    with av.open(str(video)) as container:
        every_frame = sorted(container.decode(video=0), key=lambda frame: frame.pts)
    assert len(every_frame) == 120
    geometry = load_geometry(str(tiny_model_dir))
    for stored, index in zip(_stored_frames(service, s3, job_id)[0], range(0, 120, 20), strict=True):
        expected = geometry.resize(every_frame[index].to_image())
        assert stored.size == (384, 384)
        assert np.array_equal(np.asarray(stored), np.asarray(expected))


@pytest.fixture()
def file_server(sample_videos: list[Path]) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(sample_videos[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_url_is_downloaded_and_answered(service: RunningService, file_server: str) -> None:
    job_id = _submit(
        service,
        json={"question": "Is it a cat?", "videos": [{"url": f"{file_server}/cats_2.mp4"}], "sampling": {"num_frames": 3},
              "generation": {"max_new_tokens": 5}},
    )  # fmt: skip
    job = service.wait(job_id)
    assert job["status"] == "succeeded", (job["error"], service.tail_logs())
    assert [f["index"] for f in job["result"]["frames"]] == [0, 40, 80]

    missing = service.wait(_submit(service, json={"question": "?", "videos": [{"url": f"{file_server}/nope.mp4"}]}))
    assert missing["status"] == "failed"
    assert missing["error"]["code"] == "fetch_failed"
    assert "404" in missing["error"]["message"]


def test_a_file_that_is_not_a_video_fails_with_invalid_media(service: RunningService) -> None:
    job_id = _submit(
        service,
        files=[("videos", ("holiday.mp4", io.BytesIO(b"definitely not a video " * 200), "video/mp4"))],
        data={"question": "What is in it?"},
    )
    job = service.wait(job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_media"
    assert job["error"]["message"].startswith("not a readable media file")
    # Plain words: no FFmpeg errno, no path on the worker.
    assert (
        job["error"]["message"] == "not a readable media file: its data is damaged or in no format this service reads"
    )
    assert job["result"] is None


def test_unknown_job_id_is_404_over_http(service: RunningService) -> None:
    response = requests.get(service.url("/v1/jobs/0123456789abcdef"), timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_a_cancelled_queued_job_never_runs(
    spare_redis_url: str, aws_env: dict[str, str], s3, tiny_model_dir: Path, sample_videos: list[Path], tmp_path: Path
) -> None:
    """Cancelled while no worker runs; then a real CPU worker drains the queue and must skip it."""
    from api.app import create_app
    from common.settings import load_settings

    env = service_env(spare_redis_url, aws_env, tiny_model_dir)
    settings = load_settings(env)
    client = create_app(settings).test_client()
    with open(sample_videos[0], "rb") as handle:
        created = client.post(
            "/v1/jobs", data={"question": "q", "videos": [(handle, "cats_1.mp4")]}, content_type="multipart/form-data"
        )
    job_id = created.get_json()["id"]
    assert client.delete(f"/v1/jobs/{job_id}").get_json()["status"] == "cancelled"

    broker = redis.Redis.from_url(spare_redis_url)
    assert broker.llen("cpu") == 1
    stack = Stack(env=env, logs=tmp_path)
    stack.start("cpu", cpu_worker_command(concurrency=1))
    log = tmp_path / "cpu.log"
    try:
        wait_for_workers(settings, ["cpu"], timeout_s=180)
        deadline = time.monotonic() + 120
        # The worker takes the message and, seeing the job cancelled, drops it.
        while "is cancelled; nothing to do" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "is cancelled; nothing to do" in log.read_text(), log.read_text()[-3000:]
        assert broker.llen("cpu") == 0
    finally:
        stack.stop()
    job = JobStore(redis_client(settings), ttl_s=60).get(job_id)
    assert job is not None
    assert job.status is JobStatus.CANCELLED
    assert job.attempts == 0 and job.stages == {} and job.media is None
    assert broker.llen("gpu") == 0


def test_fast_mode_reports_each_frames_distance_from_its_target(service: RunningService, tmp_path: Path) -> None:
    video = write_cat_video(tmp_path / "gop.mp4", seconds=4, fps=30, gop=30, bframes=2)
    with open(video, "rb") as handle:
        job_id = _submit(
            service,
            files=[("videos", ("gop.mp4", handle, "video/mp4"))],
            data={"question": "Fast?", "num_frames": "4", "fast": "true", "max_new_tokens": "3"},
        )
    job = service.wait(job_id)
    assert job["status"] == "succeeded", job["error"]
    frames = job["result"]["frames"]
    # Only keyframes (every 30th frame) are taken; each says how far it is from its target.
    assert all(frame["index"] % 30 == 0 for frame in frames)
    assert all("offset" in frame and abs(frame["offset"]) <= 0.5 for frame in frames)
